"""Instant checks for the exercises: `checks.<exercise>(your_function)`, one module per chapter.

A check runs your function on small cases, compares it with the reference, and explains the most
likely mistake when it differs. On success it prints one line starting with ✓. Predictions:
`checks.predict(key, question, choices, answer)` before an experiment, `checks.reveal(...)` after.
"""
from engramlib.checks._common import PREDICTIONS, band_choices, choice_between, decided_choices, predict, reveal  # noqa: F401
from engramlib.checks.ch00_start import most_likely_next  # noqa: F401
from engramlib.checks.ch01_hebbian import hebbian_update, cleanup_recall, crosstalk, cleanup_accuracy, find_n_star, choose_dimension, answer_1_1, answer_1_2  # noqa: F401
from engramlib.checks.ch02_anti_hebbian import anti_hebbian_forget, least_squares_memory, covariance_edit, edit_report, find_the_bug, answer_2_1, answer_2_2, answer_2_3  # noqa: F401
from engramlib.checks.ch03_04_grafting import graft_formula, topk_mask, lesion_region, freeze_gradients, region_overlap, mask_step, train_outside, read_lesions, overlap_control, answer_3_1, answer_3_2, answer_3_3, answer_4_1, answer_4_2, answer_4_3  # noqa: F401
from engramlib.checks.ch05_transformer import residual_sum, logit_lens, mlp_key_value, neuron_attribution, random_control, zeroing_answer, lens_answer, silencing_answer, FULL_SIZE_05  # noqa: F401
from engramlib.checks.ch06_tracing import subject_token_range, corrupt_subject, indirect_effect, restore_one_state, trace_by_loop, attribution_patching, choose_edit_layer, answer_6_1, answer_6_2, answer_6_3  # noqa: F401
from engramlib.checks.ch07_rome import key_at_subject, v_star_delta, conv1d_rank_one_edit, v_star_loss, find_update_bug, answer_7_1, answer_7_2  # noqa: F401
from engramlib.checks.ch08_evaluation import edit_success, combined_score, edit_scores, neighbour_answer, kept_answer, FULL_SIZE_08  # noqa: F401
from engramlib.checks.ch09_mass_editing import mass_update, alphaedit_update, disabling_steps, paraphrase_choices, speed_choices  # noqa: F401
from engramlib.checks.ch10_limits import trace_beyond_layer, two_hop_checks, generate_answer  # noqa: F401
from engramlib.checks.ch11_unlearning import npo_objective, activation_mse, project_out  # noqa: F401

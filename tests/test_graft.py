"""Grafting: tasks, masks, grafts and lesions behave as defined; fine-tuning learns the task, a
frozen region stays put, and the optimised mask carries the skill."""
import pytest
import torch

from engramlib import graft as G
from engramlib.models import next_token_probs
from engramlib.tinyworld.tasks import make_task


def test_tasks_are_deterministic_balanced_and_split():
    task = make_task("polarity", n_train=200, n_test=100)
    assert task == make_task("polarity", n_train=200, n_test=100)
    assert len(task["train"]) == 200 and len(task["test"]) == 100
    assert not {p for p, _ in task["train"]} & {p for p, _ in task["test"]}
    assert 0.35 < sum(y for _, y in task["train"]) / 200 < 0.65
    topic = make_task("topic", n_train=50, n_test=10)
    assert topic["label_words"] == ["food", "music", "sports", "travel"]
    assert topic["train"][0][0].endswith('has a topic that is')
    with pytest.raises(ValueError, match="unknown task"):
        make_task("sarcasm")


def _states():
    torch.manual_seed(0)
    pre = {"a": torch.randn(4, 5), "b": torch.randn(7)}
    ft = {n: t + torch.randn_like(t) * torch.linspace(0, 1, t.numel()).view_as(t) for n, t in pre.items()}
    return pre, ft


def test_graft_lesion_and_controls():
    pre, ft = _states()
    ones = {n: torch.ones_like(t) for n, t in pre.items()}
    zeros = {n: torch.zeros_like(t) for n, t in pre.items()}
    assert all(torch.equal(G.graft(pre, ft, ones)[n], ft[n]) for n in pre)
    assert all(torch.equal(G.graft(pre, ft, zeros)[n], pre[n]) for n in pre)
    m = G.top_movement_mask(pre, ft, 5)
    assert G.mask_size(m) == 5
    moved = torch.cat([(ft[n] - pre[n]).abs().flatten() for n in pre])
    chosen = torch.cat([m[n].flatten() for n in pre]).bool()
    assert moved[chosen].min() >= moved[~chosen].max()
    r = G.random_mask(pre, 5, seed=1)
    assert G.mask_size(r) == 5
    les = G.lesion(ft, m, to="pre", pre=pre)
    assert all(torch.equal(les[n], torch.where(m[n].bool(), pre[n], ft[n])) for n in pre)
    assert all(torch.equal(G.lesion(ft, m, to="zero")[n], ft[n] * (1 - m[n])) for n in pre)
    assert all(torch.equal(G.lottery_ticket(ft, m)[n], ft[n] * m[n]) for n in pre)
    assert G.region_overlap(m, m) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        G.top_movement_mask(pre, ft, 0)
    with pytest.raises(ValueError, match="needs the pretrained"):
        G.lesion(ft, m, to="pre")


def test_topk_masks_select_exactly_k_with_ties_and_zeros():
    scores = {"a": torch.tensor([[0.0, 0.0, 3.0], [0.0, 1.0, 0.0]]), "b": torch.zeros(4)}
    m = G.sigmoid_topk_mask(scores, 3)                 # the 3rd largest score is 0, as are 7 others
    assert G.mask_size(m) == 3 and m["a"][0, 2] == 1 and m["a"][1, 1] == 1
    assert m["a"].shape == (2, 3) and m["b"].shape == (4,)
    m = G.sigmoid_topk_mask({"a": torch.tensor([2.0, 1.0, 2.0, 2.0])}, 2)     # 3 tied for 2 places
    assert G.mask_size(m) == 2 and m["a"][1] == 0
    pre = {"w": torch.zeros(10)}
    ft = {"w": torch.tensor([0.0, 0.5, 0, 0, 0, 0, 0, 0, 0, 0])}          # one entry moved
    m = G.top_movement_mask(pre, ft, 4)
    assert G.mask_size(m) == 4 and m["w"][1] == 1


def test_task_accuracy_counts_the_models_own_predictions(tinyworld):
    """Labels = the model's preferred label word (from the full next-token distribution): 100 %;
    the other label: 0 %; half of each: 50 %, across uneven batches."""
    task = make_task("polarity", n_train=8, n_test=8)
    prompts = [p for p, _ in task["test"]]
    label_ids = G.label_token_ids(tinyworld, task["label_words"])
    with torch.no_grad():
        preferred = next_token_probs(tinyworld, prompts)[:, label_ids].argmax(-1).tolist()
    own = {**task, "test": list(zip(prompts, preferred))}
    other = {**task, "test": [(p, 1 - y) for p, y in own["test"]]}
    half = {**task, "test": own["test"][:4] + other["test"][4:]}
    assert G.task_accuracy(tinyworld, own, batch_size=3) == 1.0
    assert G.task_accuracy(tinyworld, other, batch_size=3) == 0.0
    assert G.task_accuracy(tinyworld, half, batch_size=3) == 0.5


def test_finetune_leaves_frozen_entries_exactly_unchanged(tinyworld):
    pre = G.get_state(tinyworld)
    gen = torch.Generator().manual_seed(0)
    frozen = {n: torch.rand(t.shape, generator=gen) < 0.5 for n, t in pre.items()}
    try:
        ft = G.finetune(tinyworld, make_task("polarity", n_train=64, n_test=8), steps=2,
                        batch_size=16, frozen=frozen, progress=False)
    finally:
        G.load_state(tinyworld, pre)
    assert all(torch.equal(ft[n][frozen[n]], pre[n][frozen[n]]) for n in pre)
    moved = sum(int((ft[n] != pre[n])[~frozen[n]].sum()) for n in pre)
    assert moved > 0.5 * sum(int((~f).sum()) for f in frozen.values())   # the rest did learn


@pytest.fixture(scope="module")
def finetuned(tinyworld):
    pre = G.get_state(tinyworld)
    task = make_task("polarity", n_train=256, n_test=128)
    before = G.task_accuracy(tinyworld, task)
    ft = G.finetune(tinyworld, task, steps=60, progress=False)
    after = G.task_accuracy(tinyworld, task)
    G.load_state(tinyworld, pre)                     # leave the shared fixture as it was
    return {"pre": pre, "ft": ft, "task": task, "before": before, "after": after}


def _grafted_accuracy(mt, finetuned, mask):
    state = G.graft(finetuned["pre"], finetuned["ft"], mask)
    return G.task_accuracy(mt, finetuned["task"], params=state)


def test_finetuning_learns_the_task_and_freezes_embeddings(tinyworld, finetuned):
    assert finetuned["after"] > max(0.85, finetuned["before"] + 0.2)
    assert all(n.startswith("transformer.h.") for n in finetuned["ft"])
    assert G.task_accuracy(tinyworld, finetuned["task"]) == pytest.approx(finetuned["before"])


def test_full_graft_recovers_finetuned_accuracy(tinyworld, finetuned):
    ones = {n: torch.ones_like(t) for n, t in finetuned["pre"].items()}
    assert _grafted_accuracy(tinyworld, finetuned, ones) == pytest.approx(finetuned["after"])


def test_optimised_mask_carries_the_skill_and_a_random_one_does_not(tinyworld, finetuned):
    pre, ft, task = finetuned["pre"], finetuned["ft"], finetuned["task"]
    out = G.optimize_mask(tinyworld, pre, ft, task, sparsity=0.01, steps=10, lr=1e8, progress=False)
    size = G.mask_size(out["mask"])
    assert 0 < size < 0.05 * G.n_params(pre)
    gain = finetuned["after"] - finetuned["before"]
    assert _grafted_accuracy(tinyworld, finetuned, out["mask"]) >= finetuned["after"] - 0.1 * gain
    random = G.random_mask(pre, size, seed=1)
    assert _grafted_accuracy(tinyworld, finetuned, random) <= finetuned["before"] + 0.2 * gain


def test_continual_learning_keeps_the_regions_apart_and_restores_the_model(tinyworld):
    a = make_task("polarity", n_train=64, n_test=32)
    b = make_task("topic", n_train=64, n_test=32)
    before = G.get_state(tinyworld)
    out = G.continual_learning(tinyworld, a, b, sparsity=0.01, sparsity_b=0.001, ft_steps=3,
                               ft_steps_b=2, batch_size=16, mask_steps=1, lr_b=0.1, progress=False)
    assert out["region_A_untouched"]                 # B's fine-tuning did not move A's region
    assert out["mask_A_size"] >= round(0.01 * out["n_params"]) and out["mask_B_size"] > 0
    moved = {n: out["ft_A"][n] != before[n] for n in before}
    assert sum(int(m.sum()) for m in moved.values()) > out["mask_A_size"]   # A's fine-tuning moved more
    after = G.get_state(tinyworld)
    assert all(torch.equal(before[n], after[n]) for n in before)            # model restored

    def accuracy(task, state):
        return G.task_accuracy(tinyworld, task, params=state)
    grafted_a = G.graft(before, out["ft_A"], out["mask_A"])
    assert out["after_A"] == {"A": accuracy(a, out["ft_A"]), "B": accuracy(b, out["ft_A"])}
    assert out["grafted_A"] == {"A": accuracy(a, grafted_a), "B": accuracy(b, grafted_a)}


def test_magnitude_mask_picks_the_largest_fine_tuned_weights():
    ft = {"a": torch.tensor([[0.1, -3.0], [0.2, 0.0]]), "b": torch.tensor([2.0, -0.5])}
    m = G.magnitude_mask(ft, 2)
    assert m["a"].tolist() == [[0.0, 1.0], [0.0, 0.0]] and m["b"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="at least one"):
        G.magnitude_mask(ft, 0)


def test_contiguous_regions_cover_exactly_their_modules(tinyworld):
    pre = G.get_state(tinyworld)
    d, L = tinyworld.model.config.n_embd, tinyworld.n_layers
    regions = G.contiguous_regions(tinyworld)
    assert list(regions)[:2] == ["MLP 0", "MLP 1"] and len(regions) == 2 * L + 2
    mlp1 = G.block_region(tinyworld, pre, *regions["MLP 1"])
    assert G.mask_size(mlp1) == 8 * d * d + 5 * d                  # c_fc (d × 4d + 4d), c_proj (4d × d + d)
    assert all((m.sum() > 0) == n.startswith("transformer.h.1.mlp.") for n, m in mlp1.items())
    assert G.mask_size(G.block_region(tinyworld, pre, *regions["attention 3"])) == 4 * d * d + 4 * d
    early = G.block_region(tinyworld, pre, *regions["early half"])
    late = G.block_region(tinyworld, pre, *regions["late half"])
    assert G.mask_size(early) + G.mask_size(late) == G.n_params(pre)
    where = G.region_by_module(tinyworld, mlp1)
    assert where["MLP 1"] == G.mask_size(mlp1) and sum(where.values()) == G.mask_size(mlp1)
    where = G.region_by_module(tinyworld, early)
    assert where["layer norms"] == 4 * d * (L // 2) and where["MLP 4"] == 0 and where["attention 0"] > 0
    with pytest.raises(ValueError, match="out of range"):
        G.block_region(tinyworld, pre, L)
    with pytest.raises(ValueError, match="part must be"):
        G.block_region(tinyworld, pre, 0, "ffn")


def test_location_vs_amount_lesions_each_region_and_a_scattered_one_of_the_same_size(tinyworld):
    pre = G.get_state(tinyworld)
    name = "transformer.h.1.mlp.c_fc.weight"
    calls = []

    def intact(state):                       # share of one matrix of block 1's MLP left non-zero
        calls.append(1)
        return float((state[name] != 0).float().mean())
    regions = {n: G.contiguous_regions(tinyworld)[n] for n in ("MLP 1", "attention 2", "MLP 3")}
    out = G.location_vs_amount(tinyworld, pre, regions, intact, to="zero")
    assert out["MLP 1"]["contiguous"] == 0.0 and out["MLP 3"]["contiguous"] == 1.0
    assert out["attention 2"]["contiguous"] == 1.0
    assert 0.85 < out["MLP 1"]["scattered"] < 0.97                 # about 8 % of the weights zeroed, everywhere
    assert out["MLP 1"]["scattered"] == out["MLP 3"]["scattered"]    # one control per size
    assert len(calls) == 3 + 2                                       # 3 regions, 2 distinct sizes
    reset = G.location_vs_amount(tinyworld, {n: t + 1 for n, t in pre.items()}, {"MLP 1": regions["MLP 1"]},
                                 lambda s: float(torch.equal(s[name], pre[name])), to="pre", pre=pre)
    assert reset["MLP 1"]["contiguous"] == 1.0 and reset["MLP 1"]["scattered"] == 0.0
    calls.clear()                             # several scores (a measurement and its control): one lesion each
    both = G.location_vs_amount(tinyworld, pre, regions, {"intact": intact, "mean": lambda s: float(s[name].mean())},
                                to="zero")
    assert both["intact"] == out and len(calls) == 3 + 2
    assert both["mean"]["MLP 1"]["contiguous"] == 0.0 and both["mean"]["MLP 3"]["contiguous"] == float(pre[name].mean())


def test_sparsity_sweep_compares_regions_of_equal_size(tinyworld, finetuned):
    pre, ft = finetuned["pre"], finetuned["ft"]
    task = {**finetuned["task"], "train": finetuned["task"]["train"][:32], "test": finetuned["task"]["test"][:48]}
    total = G.n_params(pre)
    sw = G.sparsity_sweep(tinyworld, pre, ft, task, [1e-4, 1e-2], mask_steps=2, batch_size=16)
    assert sw["sizes"] == [round(1e-4 * total), round(1e-2 * total)]
    assert len(sw["optimised"]) == 3 and sw["optimised"][0][0] == round(5e-6 * total)   # start + 2 steps

    def grafted(mask):
        return _grafted_accuracy(tinyworld, {**finetuned, "task": task}, mask)
    assert sw["top-movement"][1] == grafted(G.top_movement_mask(pre, ft, sw["sizes"][1]))
    assert sw["magnitude"][0] == grafted(G.magnitude_mask(ft, sw["sizes"][0]))
    k, optimised, top = sw["optimised"][-1]
    assert top == grafted(G.top_movement_mask(pre, ft, k))
    assert G.mask_size(sw["mask"]) in {size for size, _, _ in sw["optimised"]}
    assert sw["top-movement"][1] > sw["random"][1] + 0.2            # 1 % that moved most carries the skill

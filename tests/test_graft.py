"""Grafting: tasks, masks, grafts and lesions behave as defined; fine-tuning learns the task."""
import pytest
import torch

from engramlib import graft as G


def test_tasks_are_deterministic_balanced_and_split():
    task = G.make_task("polarity", n_train=200, n_test=100)
    assert task == G.make_task("polarity", n_train=200, n_test=100)
    assert len(task["train"]) == 200 and len(task["test"]) == 100
    assert not {p for p, _ in task["train"]} & {p for p, _ in task["test"]}
    assert 0.35 < sum(y for _, y in task["train"]) / 200 < 0.65
    topic = G.make_task("topic", n_train=50, n_test=10)
    assert topic["label_words"] == ["food", "music", "sports", "travel"]
    assert topic["train"][0][0].endswith('has a topic that is')
    with pytest.raises(ValueError, match="unknown task"):
        G.make_task("sarcasm")


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


@pytest.fixture(scope="module")
def finetuned(tinyworld):
    pre = G.get_state(tinyworld)
    task = G.make_task("polarity", n_train=256, n_test=128)
    before = G.task_accuracy(tinyworld, task)
    ft = G.finetune(tinyworld, task, steps=60, progress=False)
    after = G.task_accuracy(tinyworld, task)
    G.load_state(tinyworld, pre)                     # leave the shared fixture as it was
    return {"pre": pre, "ft": ft, "task": task, "before": before, "after": after}


def test_finetuning_learns_the_task_and_freezes_embeddings(tinyworld, finetuned):
    assert finetuned["after"] > max(0.85, finetuned["before"] + 0.2)
    assert all(n.startswith("transformer.h.") for n in finetuned["ft"])
    assert G.task_accuracy(tinyworld, finetuned["task"]) == pytest.approx(finetuned["before"])


def test_full_graft_recovers_finetuned_accuracy(tinyworld, finetuned):
    pre, ft, task = finetuned["pre"], finetuned["ft"], finetuned["task"]
    ones = {n: torch.ones_like(t) for n, t in pre.items()}
    params = G._full_params(tinyworld, G.graft(pre, ft, ones))
    assert G.task_accuracy(tinyworld, task, params=params) == pytest.approx(finetuned["after"])


def test_optimize_mask_returns_a_sparse_mask_no_worse_than_its_start(tinyworld, finetuned):
    pre, ft, task = finetuned["pre"], finetuned["ft"], finetuned["task"]
    out = G.optimize_mask(tinyworld, pre, ft, task, sparsity=0.01, steps=10, lr=1e8, progress=False)
    size = G.mask_size(out["mask"])
    assert 0 < size < 0.05 * G.n_params(pre)
    assert max(acc for _, acc, _ in out["history"]) >= out["history"][0][1]


def test_continual_learning_keeps_the_regions_apart_and_restores_the_model(tinyworld):
    a = G.make_task("polarity", n_train=64, n_test=32)
    b = G.make_task("topic", n_train=64, n_test=32)
    before = G.get_state(tinyworld)
    out = G.continual_learning(tinyworld, a, b, sparsity=0.01, sparsity_b=0.001, ft_steps=3,
                               mask_steps=1, lr_b=0.1, progress=False)
    assert out["region_A_untouched"]
    assert out["mask_A_size"] >= round(0.01 * out["n_params"]) and out["mask_B_size"] > 0
    assert sum(int(((out["mask_A"][n] > 0.5) & (out["mask_B"][n] > 0.5)).sum()) for n in before) == 0
    moved = {n: out["ft_A"][n] != before[n] for n in before}
    assert sum(int(m.sum()) for m in moved.values()) > out["mask_A_size"]   # A's fine-tuning moved more
    after = G.get_state(tinyworld)
    assert all(torch.equal(before[n], after[n]) for n in before)            # model restored
    for key in ("after_A", "sequential", "grafted_A", "B_outside_A", "forget_free"):
        assert set(out[key]) == {"A", "B"} and all(0 <= v <= 1 for v in out[key].values())

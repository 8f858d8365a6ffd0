"""Checks of chapter 05 (inside the transformer): each accepts the reference and diagnoses typical mistakes with a specific message."""
import pytest
import torch

from engramlib import checks


def expect(check, fn, message):
    with pytest.raises(AssertionError, match=message):
        check(fn)


def _ch05_pieces(mt, prompt):
    from engramlib.lens import residual_components
    return residual_components(mt, prompt)


def test_residual_sum(tinyworld, capsys):
    check = lambda fn: checks.residual_sum(fn, mt=tinyworld)
    c = lambda mt, p: _ch05_pieces(mt, p)
    check(lambda mt, p: c(mt, p)["embed"] + c(mt, p)["attn"].sum(0) + c(mt, p)["mlp"].sum(0))
    assert "✓" in capsys.readouterr().out
    check(lambda mt, p: c(mt, p)["final"][None])                     # a batch dimension of 1 is fine
    ln_f = lambda mt, h: mt.module(mt.spec.final_norm)(h)
    expect(check, lambda mt, p: ln_f(mt, c(mt, p)["final"]), "BEFORE ln_f")
    expect(check, lambda mt, p: c(mt, p)["attn"].sum(0) + c(mt, p)["mlp"].sum(0), "embeddings are missing")
    expect(check, lambda mt, p: c(mt, p)["embed"] + c(mt, p)["mlp"].sum(0), "attention outputs are missing")
    expect(check, lambda mt, p: c(mt, p)["embed"] + c(mt, p)["attn"].sum(0), "MLP outputs are missing")
    blocks = lambda mt, p: c(mt, p)["embed"] + (c(mt, p)["attn"] + c(mt, p)["mlp"]).cumsum(0)
    expect(check, lambda mt, p: blocks(mt, p).sum(0), "blocks' OUTPUTS")
    expect(check, lambda mt, p: c(mt, p)["embed"] + c(mt, p)["attn"][-1] + c(mt, p)["mlp"][-1], "only the last layer")
    expect(check, lambda mt, p: c(mt, p)["embed"] + c(mt, p)["attn"] + c(mt, p)["mlp"], "sum over the layers")
    expect(check, lambda mt, p: c(mt, p)["final"].sum(0), "EVERY token")


def _hidden(mt, prompt, hf=False):
    """Block outputs [L, T, d] via hooks, or the model's output_hidden_states (L + 1 of them)."""
    from engramlib.hooks import TraceDict
    ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"]
    names = [mt.spec.layer.format(l) for l in range(mt.n_layers)]
    with torch.no_grad(), TraceDict(mt.model, names) as td:
        out = mt.model(input_ids=ids, output_hidden_states=True)
    return torch.stack([h[0] for h in out.hidden_states]) if hf else torch.stack([td[n].output[0] for n in names])


def test_logit_lens(tinyworld, gpt2_standin, capsys):
    from engramlib import lens
    check = lambda fn: checks.logit_lens(fn, mt=tinyworld)
    check(lens.logit_lens)
    checks.logit_lens(lens.logit_lens, mt=gpt2_standin)
    assert capsys.readouterr().out.count("✓") == 2
    head = lambda mt, h: mt.module(mt.spec.lm_head)(mt.module(mt.spec.final_norm)(h))
    with torch.no_grad():
        expect(check, lambda mt, p: torch.softmax(mt.module(mt.spec.lm_head)(_hidden(mt, p)[:, -1]), -1), "ln_f is missing")
        expect(check, lambda mt, p: lens.lens_probs(mt, _hidden(mt, p)[:, 0]), "FIRST token")
        expect(check, lambda mt, p: head(mt, _hidden(mt, p)[:, -1]), "logits")
        expect(check, lambda mt, p: torch.log_softmax(head(mt, _hidden(mt, p)[:, -1]), -1), "log-probabilities")
        expect(check, lambda mt, p: torch.softmax(head(mt, _hidden(mt, p)[:, -1]), 0), "wrong dimension")
        expect(check, lambda mt, p: lens.lens_probs(mt, _hidden(mt, p)), "LAST position")
        expect(check, lambda mt, p: lens.lens_probs(mt, _hidden(mt, p, hf=True)[:, -1]), "one row per BLOCK")
        expect(check, lambda mt, p: lens.lens_probs(mt, _hidden(mt, p, hf=True)[:-1, -1]), "off by one")
        expect(check, lambda mt, p: lens.lens_probs(mt, _hidden(mt, p, hf=True)[1:, -1]), "ln_f ran twice")
        expect(check, lambda mt, p: lens.logit_lens(mt, p).T, "transpose")
        expect(check, lambda mt, p: _hidden(mt, p)[:, -1], "decode them")


def _kv_mlp(transpose_keys=False, transpose_values=False, bias_k=True, bias_v=True, act=None):
    def fn(mt, layer, x):
        mlp = mt.module(mt.spec.mlp, layer)
        W_fc = mlp.c_fc.weight.T if transpose_keys else mlp.c_fc.weight
        W_proj = mlp.c_proj.weight.T if transpose_values else mlp.c_proj.weight
        a = (act or mlp.act)(x @ W_fc + (mlp.c_fc.bias if bias_k else 0))
        return a @ W_proj + (mlp.c_proj.bias if bias_v else 0)
    return fn


def test_mlp_key_value(tinyworld, gpt2_standin, capsys):
    check = lambda fn: checks.mlp_key_value(fn, mt=tinyworld)
    with torch.no_grad():
        check(_kv_mlp())
        checks.mlp_key_value(_kv_mlp(), mt=gpt2_standin)
        assert capsys.readouterr().out.count("✓") == 2
        expect(check, _kv_mlp(transpose_keys=True), "transposed Conv1D")
        expect(check, _kv_mlp(transpose_values=True), "transposed Conv1D")
        expect(check, _kv_mlp(transpose_keys=True, transpose_values=True), "transposed Conv1D")
        expect(check, _kv_mlp(bias_v=False), "output bias b_V")
        expect(check, _kv_mlp(bias_k=False), "key bias b_K")
        expect(check, _kv_mlp(act=torch.relu), "wrong activation")
        expect(check, _kv_mlp(act=torch.nn.functional.gelu), "wrong activation")

        def activations_only(mt, layer, x):
            mlp = mt.module(mt.spec.mlp, layer)
            return mlp.act(x @ mlp.c_fc.weight + mlp.c_fc.bias)
        expect(check, activations_only, "those are the activations")
        # on the real shapes a transposed weight raises a shape error, diagnosed the same way
        expect(lambda fn: checks.mlp_key_value(fn, mt=tinyworld),
               lambda mt, layer, x: _kv_mlp(transpose_keys=mt.n_layers > 2)(mt, layer, x), "Conv1D stores")


def _attribution(objective="logp", times_activation=True, gradient=True, position=-1, space=True, sign=1.0):
    """Activation × gradient of log P(answer) and its typical mistakes, written out plainly."""
    from engramlib.hooks import Trace
    from engramlib.lens import activation_name

    def fn(mt, prompt, answer, layer):
        ids = mt.tokenizer(prompt, return_tensors="pt")["input_ids"]
        o = mt.tokenizer((" " if space else "") + answer)["input_ids"][0]
        box = {}

        def leaf(h, name):
            box["a"] = h.detach().clone().requires_grad_()
            return box["a"]
        with torch.enable_grad(), Trace(mt.model, activation_name(mt, layer), edit_output=leaf):
            logits = mt.model(input_ids=ids).logits[0, -1]
            score = {"logp": torch.log_softmax(logits, -1)[o], "p": torch.softmax(logits, -1)[o],
                     "logit": logits[o]}[objective]
            g = torch.autograd.grad(sign * score, box["a"])[0][0]
        a = box["a"][0].detach()
        out = (a if times_activation else 1) * (g if gradient else 1)
        return out if position is None else out[position]
    return fn


def test_neuron_attribution(tinyworld, gpt2_standin, capsys):
    from engramlib import lens
    check = lambda fn: checks.neuron_attribution(fn, mt=tinyworld)
    check(lambda mt, p, ans, layer: lens.neuron_attribution(mt, p, ans, layer))
    check(_attribution())
    checks.neuron_attribution(_attribution(), mt=gpt2_standin)
    assert capsys.readouterr().out.count("✓") == 3
    expect(check, _attribution(sign=-1.0), "wrong sign")
    expect(check, _attribution(times_activation=False), "gradient alone")
    expect(check, _attribution(gradient=False), "activation alone")
    expect(check, _attribution(objective="p"), "differentiated P")
    expect(check, _attribution(objective="logit"), "logit")
    expect(check, _attribution(position=0), "FIRST token")
    expect(check, _attribution(space=False), "leading space")
    expect(check, _attribution(position=None), "one score per neuron")
    expect(check, lambda mt, p, ans, layer: lens.mlp_activations(mt, p, layer)[-1, :mt.model.config.n_embd], "INPUT of c_proj")


def _control(layers="same", replace=False, avoid=True, seeded=True):
    """Exercise 5.5's control, with switches for the typical mistakes."""
    def fn(sites, d_mlp, generator):
        gen = generator if seeded else torch.Generator().manual_seed(0)
        L = max(l for l, _ in sites) + 1
        out = []
        for l, _ in sites:
            layer = l if layers == "same" else int(torch.randint(L, (1,), generator=gen))
            taken = {n for k, n in sites if k == layer} | ({n for k, n in out if k == layer} if not replace else set())
            free = [n for n in range(d_mlp) if not (avoid and n in taken) and (replace or (layer, n) not in out)]
            out.append((layer, free[int(torch.randint(len(free), (1,), generator=gen))]))
        return out
    return fn


def test_random_control(capsys):
    from engramlib import lens
    checks.random_control(lens.random_sites_like)
    checks.random_control(_control())
    assert capsys.readouterr().out.count("✓") == 2
    expect(checks.random_control, _control(layers="uniform"), "same count per layer|a fair control keeps the layers")
    expect(checks.random_control, _control(replace=True), "appear twice")
    expect(checks.random_control, _control(avoid=False), "includes attributed neurons")
    expect(checks.random_control, _control(seeded=False), "same neurons")
    expect(checks.random_control, lambda sites, d, g: [(l, (n + 1) % d) for l, n in sites], "appear twice|attributed|same neurons")
    expect(checks.random_control, lambda sites, d, g: sites[:-1], "need 7 control neurons")


def test_chapter_05_reveals_count_ties_and_boundaries():
    # 5.1: blocks tied for the largest drop count for each of their thirds; a drop below 0.05 is "none"
    assert checks.zeroing_answer(0.8, [0.2, 0.7, 0.75, 0.79, 0.8, 0.8]) == {"a"}
    assert checks.zeroing_answer(0.8, [0.2, 0.7, 0.75, 0.2, 0.8, 0.8]) == {"a", "b"}        # a tie
    assert checks.zeroing_answer(0.8, [0.79, 0.8, 0.78, 0.8, 0.8, 0.8]) == {"d"}
    assert checks.zeroing_answer(0.8, [0.8, 0.8, 0.8, 0.8, 0.8, 0.75]) == {"c", "d"}         # drop = 0.05
    # 5.2: a block at exactly one half counts for both readings of "more than half"
    assert checks.lens_answer([0.0, 0.2, 0.4, 0.7, 0.9, 1.0]) == {"c"} and checks.lens_answer([0.0, 0.6, 1.0, 1.0]) == {"b"}
    assert checks.lens_answer([0.0, 0.5, 0.5, 0.7, 0.9, 1.0]) == {"b", "c"}
    assert checks.lens_answer([0.8, 0.9, 1.0]) == {"a"} and checks.lens_answer([0.1, 0.2, 1.0]) == {"d"}
    # 5.3: a value on a boundary belongs to both choices
    assert checks.silencing_answer(0.8, 0.05) == {"a"} and checks.silencing_answer(0.8, 0.7) == {"c"}
    assert checks.silencing_answer(0.8, 0.6) == {"b", "c"} and checks.silencing_answer(0.8, 0.1) == {"a", "b"}
    # the full-size measurements a small run shows: a text and the choices they make right
    for key, (text, answers) in checks.FULL_SIZE_05.items():
        assert text and answers and answers <= {"a", "b", "c", "d"}, key

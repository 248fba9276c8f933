"""The chunked output-layer loss equals the plain one (logits, then cross-entropy)."""

import pytest
import torch
import torch.nn.functional as F

from letrecipes.components.loss import linear_cross_entropy
from letrecipes.components.models import forward_with_loss, llama_model


def plain(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def inputs(dtype=torch.float32, tokens=(3, 37), dim=24, vocab=101, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*tokens, dim, generator=gen, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, dim, generator=gen) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, tokens, generator=gen)
    labels[0, :5] = -100  # ignored positions (padding, a document's first token)
    labels[2, -1] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_tokens", [1, 16, 37, 50, 10_000])
def test_loss_and_gradients_equal_the_plain_path_in_fp32(chunk_tokens):
    hidden, weight, labels = inputs()
    expected = plain(hidden, weight, labels)
    grad_h, grad_w = torch.autograd.grad(expected * 1.7, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens)
    got_h, got_w = torch.autograd.grad(loss * 1.7, (hidden, weight))  # a scaled loss: backward scales the grads
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, grad_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_w, grad_w, rtol=1e-5, atol=1e-7)
    assert got_h[0, :5].abs().max() == 0  # ignored tokens get no gradient


def test_under_bf16_autocast_it_matches_the_plain_path_to_bf16_rounding():
    hidden, weight, labels = inputs(tokens=(4, 64), dim=64, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(hidden, weight, labels)
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=48)
    grads = [torch.autograd.grad(x, (hidden, weight)) for x in (expected, loss)]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=2e-3)
    for got, want in zip(grads[1], grads[0]):
        assert got.dtype == want.dtype == torch.float32
        assert (got - want).norm() / want.norm() < 2e-2


def test_without_gradients_it_is_the_same_loss():
    hidden, weight, labels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, 8), plain(hidden, weight, labels))


@pytest.mark.parametrize("tied", [True, False])
def test_a_model_forward_gives_the_plain_loss_hidden_states_and_gradients(tied):
    torch.manual_seed(0)
    model = llama_model(num_layers=3, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64, vocab_size=128,
                        max_seq_len=16, tie_word_embeddings=tied)
    tokens = torch.randint(0, 128, (2, 16))
    labels = torch.roll(tokens, -1, 1)
    runs = []
    for chunk_tokens in (0, 5):
        model.zero_grad()
        hidden, nll = forward_with_loss(model, tokens, labels, layers=(1, 3), chunk_tokens=chunk_tokens)
        (nll + hidden[1].square().mean()).backward()
        runs.append((nll.detach(), {k: v.detach() for k, v in hidden.items()},
                     {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_nll, plain_hidden, plain_grads), (nll, hidden, grads) = runs
    torch.testing.assert_close(nll, plain_nll, rtol=1e-6, atol=1e-6)
    assert hidden.keys() == plain_hidden.keys() == {1, 3}
    for layer in hidden:
        torch.testing.assert_close(hidden[layer], plain_hidden[layer])
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert "unembed" not in vars(model)  # the model is itself again after the call


def test_chunk_size_must_be_positive():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="chunk_tokens=0 must be >= 1"):
        linear_cross_entropy(hidden, weight, labels, 0)


def test_a_run_with_a_chunked_loss_trains_like_one_without(let_overrides, tmp_path):
    """LET in one process, then under FSDP2 in a group of one (the root unit gathers the
    output weight inside the model's forward, where the chunked loss runs): every logged
    figure equal, step for step. The micro-batch (4 x 32 tokens) is cut into chunks of 24."""
    from letrecipes import let_pretrain
    from tests.test_distributed import losses

    common = [*let_overrides, "max_steps=4", "alignment.schedule.stop=3", "eval_every=2"]
    for name, extra in (("plain", []), ("fsdp", ["fsdp.enabled=true"])):
        for chunk in (0, 24):
            let_pretrain.recipe_main(["--config", "let_tiny", *common, *extra, f"loss_chunk_tokens={chunk}",
                                      f"output_dir={tmp_path / f'{name}-{chunk}'}"])
        for key in ("loss", "nll", "align_loss", "grad_norm", "val_loss"):
            a, b = losses(tmp_path / f"{name}-0", key), losses(tmp_path / f"{name}-24", key)
            assert [s for s, _ in a] == [s for s, _ in b] and a, key
            assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5), (name, key)


def test_two_ranks_with_a_chunked_loss_train_like_two_without(base_overrides, tmp_path):
    """The output weight's gradient, computed in the forward, is reduced across ranks like
    any other."""
    from tests.test_distributed import losses, tune_run_2proc

    common = [*base_overrides, "max_steps=3", "eval_every=0"]
    for chunk in (0, 40):
        tune_run_2proc("pretrain", "pretrain_tiny", *common, f"loss_chunk_tokens={chunk}",
                       f"output_dir={tmp_path / str(chunk)}")
    for key in ("loss", "grad_norm"):
        a, b = losses(tmp_path / "0", key), losses(tmp_path / "40", key)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
        assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5), key

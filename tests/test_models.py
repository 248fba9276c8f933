import re

import torch

from letrecipes.components.models import ModelArgs, build_model, count_parameters, forward_with_hidden, llama_model

ARGS = ModelArgs(vocab_size=64, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
                 max_seq_len=16)


def test_hidden_capture_matches_the_plain_forward_and_the_layer_convention():
    torch.manual_seed(0)
    model = build_model(ARGS)
    tokens = torch.randint(0, 64, (2, 16))
    hidden, logits = forward_with_hidden(model, tokens, [0, 1, 2, 4])
    torch.testing.assert_close(logits, model(tokens))
    torch.testing.assert_close(hidden[0], model.tok_embeddings(tokens))
    torch.testing.assert_close(hidden[1], model.layers[0](model.tok_embeddings(tokens)))
    # the last layer is after the final norm (Hugging Face hidden_states[-1])
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h)
    torch.testing.assert_close(hidden[4], model.norm(h))


def test_hidden_only_forward_stops_early_and_agrees():
    model = build_model(ARGS)
    tokens = torch.randint(0, 64, (1, 16))
    full, _ = forward_with_hidden(model, tokens, [2])
    partial, logits = forward_with_hidden(model, tokens, [2], logits=False)
    assert logits is None
    torch.testing.assert_close(partial[2], full[2])


def test_from_scratch_init_scales_residual_projections():
    torch.manual_seed(0)
    model = build_model(ModelArgs(vocab_size=64, num_layers=8, num_heads=4, num_kv_heads=4, embed_dim=128,
                                  intermediate_dim=256, max_seq_len=16), init_std=0.02)
    q_std = torch.cat([layer.attn.q_proj.weight.flatten() for layer in model.layers]).std().item()
    out_std = torch.cat([layer.attn.output_proj.weight.flatten() for layer in model.layers]).std().item()
    assert abs(q_std - 0.02) < 0.001
    assert abs(out_std - 0.02 / 4.0) < 0.0005  # 1 / sqrt(2 * 8 layers)
    assert all(torch.all(layer.sa_norm.scale == 1) for layer in model.layers)


def test_llama_model_builder_defaults_and_tied_embeddings():
    model = llama_model(vocab_size=64, num_layers=2, num_heads=2, embed_dim=32, max_seq_len=16)
    assert model.model_args.intermediate_dim == 128  # 8/3 * 32 rounded up to 64
    assert model.model_args.num_kv_heads == 2
    # tied: the output head adds no parameters
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert "output.weight" not in model.state_dict()


def test_a_model_size_of_the_wrong_kind_is_one_error_naming_the_key():
    """Sizes given by hand or read from another tool's file: 0, -1, 1.5, true or 2**63 were
    a ZeroDivisionError, torch's 'upper bound and lower bound inconsistent with step sign'
    or an overflow inside torch, and a negative init_std torch's 'normal expects std >= 0'."""
    import pytest

    from letrecipes.components.registry import ComponentError

    good = dict(vocab_size=64, num_layers=2, num_heads=2, embed_dim=16, max_seq_len=8)
    for key, value, said in [("num_layers", 0, "model.num_layers=0 must be an integer from 1 to 2,147,483,647"),
                             ("num_heads", -1, "model.num_heads=-1 must be an integer from 1"),
                             ("num_kv_heads", 1.5, "model.num_kv_heads=1.5 must be an integer"),
                             ("intermediate_dim", True, "model.intermediate_dim=True must be an integer"),
                             ("vocab_size", 2**63, "model.vocab_size=9223372036854775808 must be an integer"),
                             ("norm_eps", float("nan"), "model.norm_eps=nan must be a finite number > 0"),
                             ("tie_word_embeddings", 1, "model.tie_word_embeddings=1 must be true or false"),
                             ("rope_scaling", {"factor": "x", "low_freq_factor": 1, "high_freq_factor": 4,
                                               "original_max_position_embeddings": 8},
                              "model.rope_scaling.factor='x' must be a finite number > 0"),
                             ("init_std", -1, "model.init_std=-1 must be a finite number > 0")]:
        with pytest.raises(ComponentError, match=re.escape(said)):
            llama_model(**{**good, key: value})
    assert count_parameters(llama_model(**good)) > 0

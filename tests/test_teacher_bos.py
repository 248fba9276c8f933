"""A teacher reads its BOS before each window when its tokenizer puts one before every text.

Llama 3 (the 7B recipe's teacher), Gemma, Mistral and OPT were trained on texts that begin
with a BOS; the recipe fed them windows of the corpus without it, so the teacher's states
were those of inputs it never saw in training (Gemma's go astray). ``teacher.prepend_bos``
(auto by default) puts it first and drops its position from what the teacher returns.
"""

import json
import shutil

import pytest
import torch

from letrecipes.components.checkpointing import COMPLETE_MARKER, describe_files
from letrecipes.components.metrics import read_metrics
from letrecipes.components.teachers import TeacherError, load_teacher, teacher_bos
from tests.test_recipes import expect_setup_error, run_let

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
BOS = "<|begin_of_text|>"


def bos_tokenizer(tokenizer_path, folder):
    """The test tokenizer with a BOS that it puts before every text, as Llama 3's does."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.add_special_tokens([BOS])
    bos = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                                             special_tokens=[(BOS, bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer


def saved_teacher(family, tokenizer_path, folder):
    """A random model of ``family`` (llama: built here; gemma: run by transformers) with that tokenizer."""
    tokenizer = bos_tokenizer(tokenizer_path, folder)
    shape = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)) if family == "llama" else \
        transformers.GemmaForCausalLM(transformers.GemmaConfig(**shape, head_dim=16))
    model.eval().save_pretrained(folder)
    return model, tokenizer


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_the_teacher_reads_its_bos_first_and_returns_the_positions_it_was_given(family, tokenizer_path, tmp_path):
    model, tokenizer = saved_teacher(family, tokenizer_path, tmp_path)
    bos = tokenizer.token_to_id(BOS)
    tokens = torch.randint(0, bos, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # what its tokenizer gives it: the BOS, then the text
        expected = model(torch.cat([torch.full((2, 1), bos), tokens], dim=1), output_hidden_states=True)
        unprefixed = model(tokens, output_hidden_states=True)
    teacher = load_teacher({"path": str(tmp_path), "dtype": "fp32"})
    assert teacher.bos == (bos, BOS) and teacher_bos({"path": str(tmp_path)}) == (bos, BOS)
    states = teacher.hidden_states(tokens, [1, 2])
    for layer in (1, 2):
        torch.testing.assert_close(states[layer], expected.hidden_states[layer][:, 1:])
    torch.testing.assert_close(teacher.logits(tokens), expected.logits[:, 1:])
    plain = load_teacher({"path": str(tmp_path), "dtype": "fp32", "prepend_bos": False})
    assert plain.bos is None
    torch.testing.assert_close(plain.hidden_states(tokens, [2])[2], unprefixed.hidden_states[2])
    no_bos = tmp_path.parent / f"{tmp_path.name}_no_bos"  # the same weights with a tokenizer that puts none
    shutil.copytree(tmp_path, no_bos)
    shutil.copy(tokenizer_path, no_bos / "tokenizer.json")
    assert load_teacher({"path": str(no_bos), "dtype": "fp32"}).bos is None
    with pytest.raises(TeacherError, match=r"teacher\.prepend_bos=true, but .* reads no token before a text"):
        load_teacher({"path": str(no_bos), "prepend_bos": True})
    # a damaged tokenizer.json is named under the teacher's key (was: the tokenizers library's Exception)
    (no_bos / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}')
    with pytest.raises(TeacherError, match=r"^teacher\.path: '.*tokenizer\.json' is not a tokenizer\.json \(Token `b` "
                                           r"out of vocabulary"):
        load_teacher({"path": str(no_bos)})


def test_a_let_run_gives_the_teacher_its_bos_and_a_run_begun_without_it_goes_on_without(tokenizer_path, base_overrides,
                                                                                          tmp_path, capsys):
    teacher = tmp_path / "teacher"
    saved_teacher("llama", tokenizer_path, teacher)
    common = [*base_overrides, f"tokenizer.path={teacher / 'tokenizer.json'}", f"teacher.path={teacher}",
              "teacher.dtype=fp32", "alignment.schedule._component_=linear", "alignment.schedule.stop=4",
              "data.seq_len=31"]
    run = tmp_path / "run"
    run_let(*common, f"output_dir={run}", "max_steps=2", "save_every=2")
    assert f"it reads its BOS '{BOS}' (id 512) before each window" in capsys.readouterr().out
    assert json.loads((run / "run_info.json").read_text(encoding="utf-8"))["teacher_bos"] == [512, BOS]
    # a model trained here read no BOS, whatever its tokenizer does: as a teacher it reads none either, and its
    # export's tokenizer puts none before a prompt (it put <|begin_of_text|>, whose embedding never trained)
    assert teacher_bos({"path": str(run / "final")}) is None
    exported = transformers.AutoTokenizer.from_pretrained(run / "final")
    assert exported("To be, or not to be").input_ids == \
        exported("To be, or not to be", add_special_tokens=False).input_ids != []
    assert exported.convert_ids_to_tokens(512) == BOS  # the vocabulary as it was
    # the window and the BOS must fit the teacher's 32 positions
    expect_setup_error(run_let, *common, f"output_dir={tmp_path / 'long'}", "data.seq_len=32", "max_steps=1",
                       match="data.seq_len=32 is longer than the teacher's context (32 tokens, ")
    expect_setup_error(run_let, *common, f"output_dir={tmp_path / 'long'}", "data.seq_len=32", "max_steps=1",
                       match=f"; 31 after the BOS '{BOS}' it reads first): it cannot read a whole training sequence. "
                             "Fix: data.seq_len <= 31, or teacher.prepend_bos=false.")

    # a run begun before the BOS was read (its records do not say) goes on as it began
    checkpoint = run / "checkpoints" / "step_00000002"
    record = json.loads((checkpoint / "run_info.json").read_text(encoding="utf-8"))
    del record["teacher_bos"]
    (checkpoint / "run_info.json").write_text(json.dumps(record))
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))  # as that older run wrote it
    marker["files"].update(describe_files(checkpoint, ["run_info.json"]))
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker))
    run_let(*common, f"output_dir={run}", "max_steps=4", "save_every=2", "resume=true")
    out = capsys.readouterr().out
    assert f"began before the teacher read its tokenizer's BOS '{BOS}' before each window" in out
    assert "it reads its BOS" not in out
    assert json.loads((run / "checkpoints" / "step_00000004" / "run_info.json").read_text())["teacher_bos"] is None
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "align_loss" in r] == [1, 2, 3, 4]

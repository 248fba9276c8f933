"""A teacher format of your own, registered from a module of your own.

The format: one ``.npz`` file holding the weights (this project's tensor names) and the
model's shape as JSON under ``args``, with the tokenizer beside it as
``<name>.tokenizer.json``. Make one from any letrecipes export, then use it as a teacher:

    python docs/examples/npz_teacher.py outputs/pretrain_tiny/final outputs/teacher.npz
    cd docs/examples
    tune run letrecipes/let_pretrain --config let_tiny 'imports=[npz_teacher]' \\
        teacher.path=../../outputs/teacher.npz tokenizer.source=teacher ...

``teacher._component_: auto`` finds it through ``detect``; ``npz`` names it outright.
``dry_run=true`` reads its shape through ``describe`` and ``tokenizer.source: teacher``
its tokenizer through ``tokenizer``, neither loading the weights.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from letrecipes.components.models import ModelArgs
from letrecipes.components.teachers import Teacher, TeacherFormat, build_frozen, register_format


@register_format("npz")
class NpzFormat(TeacherFormat):
    looks_like = "a .npz file with an `args` entry (docs/examples/npz_teacher.py)"

    @classmethod
    def detect(cls, path: Path) -> bool:  # cheap: a name, never the weights
        return path.is_file() and path.suffix == ".npz"

    def describe(self, path: Path) -> ModelArgs:
        with np.load(path) as archive:  # reads the `args` entry only
            return ModelArgs.from_dict(json.loads(str(archive["args"])))

    def tokenizer(self, path: Path) -> Path:
        return path.with_suffix(".tokenizer.json")

    def load(self, path: Path, dtype: str, device) -> Teacher:
        args = self.describe(path)

        def load_state(expected, cast):  # build_frozen checks names and shapes against `args`
            with np.load(path) as archive:
                return {name[2:]: cast(torch.from_numpy(archive[name])) for name in archive.files
                        if name.startswith("w/")}

        return Teacher(build_frozen(args, load_state, dtype, device), tokenizer_path=self.tokenizer(path),
                       source=str(path))


def save_npz(export_dir: Path, out: Path) -> Path:
    """Write any teacher a registered format reads (a letrecipes export, a Hugging Face
    folder, ...) in this format: this project's tensor names, fp32."""
    from dataclasses import asdict

    from letrecipes.components.teachers import describe_teacher, load_teacher

    teacher = load_teacher({"path": str(export_dir), "dtype": "fp32"})
    args = describe_teacher({"path": str(export_dir)})
    weights = {f"w/{k}": v.numpy() for k, v in teacher.model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, args=np.array(json.dumps(asdict(args))), **weights)
    shutil.copy(teacher.tokenizer_path, out.with_suffix(".tokenizer.json"))
    return out


if __name__ == "__main__":
    print(save_npz(Path(sys.argv[1]), Path(sys.argv[2])))

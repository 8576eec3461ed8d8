"""Reading and writing checkpoints safely (unpickling runs no code); rebuilding a VQGAN from its tensors alone."""

import os
import pickle
import re
import types
from pathlib import Path
from typing import Any

import torch

from .model import VQGAN, VQGANConfig


class CheckpointError(ValueError):
    """A file that is not a loadable checkpoint; the message names the file and the reason."""


_ALLOWED_GLOBALS = {
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
    "torch": {"Size", "device"},
    "torch._utils": {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"},
    # numpy scalars and arrays, which some training loops store as metrics
    "_codecs": {"encode"},
    "numpy": {"dtype", "ndarray"},
    "numpy.core.multiarray": {"scalar", "_reconstruct"},
    "numpy._core.multiarray": {"scalar", "_reconstruct"},
}
# Training frameworks whose objects appear in checkpoint metadata; their state is data, never code we need.
_INERT_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf")


class Placeholder:
    """Stands in for a framework class: keeps whatever state was pickled for it and does nothing else."""

    qualname: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.qualname}>"


class _RestrictedUnpickler(pickle.Unpickler):
    """Tensors and plain data pass, training-framework classes become inert placeholders, all else is refused.
    Not `weights_only=True`: that refuses taming's checkpoints, whose Lightning callbacks are keyed by a class."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module.split(".")[0] in _INERT_MODULES:
            return type(name, (Placeholder,), {"qualname": f"{module}.{name}", "__module__": __name__})
        raise CheckpointError(f"refusing to load {module}.{name}: a checkpoint may hold only tensors and plain data")


# torch.load uses a pickle module's `Unpickler` (zip checkpoints) and `load` (legacy ones).
_restricted_pickle = types.SimpleNamespace(
    __name__="vqgan.checkpoint.restricted_pickle", Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load())


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Unpickle a checkpoint without running any code it carries; CheckpointError names the file and why."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    try:
        return torch.load(path, map_location=map_location, pickle_module=_restricted_pickle, weights_only=False)
    except CheckpointError as e:  # refused by find_class, which does not know the file
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # torch reports truncation and foreign formats with many exception types
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format): {e}") from e


def save_checkpoint_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save that never leaves a half-written file: a crash keeps the previous checkpoint whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are private (0600); this one gets the permissions the umask gives any new file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_MODEL_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
# A VQGAN nested in a larger model: taming's transformer and latent diffusion call it first_stage_model.
_NESTED_PREFIX = "first_stage_model."


def infer_config(state: dict[str, torch.Tensor], path: str | os.PathLike = "<checkpoint>") -> VQGANConfig:
    """Read the architecture off the tensor shapes, so that no YAML is needed."""
    try:
        ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
        levels = _count(state, r"encoder\.down\.(\d+)\.")
        num_res_blocks = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
        ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
        attn_levels = tuple(i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state)
        n_embed, embed_dim = state["quantize.embedding.weight"].shape
        z_channels = state["quant_conv.weight"].shape[1]
        encoder_out = state["encoder.conv_out.weight"].shape[0]
        out_ch = state["decoder.conv_out.weight"].shape[0]
    except KeyError as e:
        if "quantize.embed.weight" in state:
            raise CheckpointError(f"{path}: Gumbel-quantized VQGANs are not supported") from None
        raise CheckpointError(f"{path}: not a VQGAN state dict: missing tensor {e}") from None
    if levels == 0 or num_res_blocks == 0:
        raise CheckpointError(f"{path}: not a VQGAN state dict: the encoder has no levels or res blocks")
    return VQGANConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_levels=attn_levels,
                       in_channels=in_channels, out_ch=out_ch, z_channels=z_channels,
                       double_z=encoder_out == 2 * z_channels, embed_dim=embed_dim, n_embed=n_embed)


def load_vqgan(path: str | os.PathLike, device: str | torch.device = "cpu") -> VQGAN:
    """A VQGAN in eval mode from a taming `.ckpt`, our `{"state_dict": ...}` or a bare or nested state dict. Loss
    weights are dropped; any other stray tensor is an error, so a wrong file is caught here, not by odd images."""
    obj = load_checkpoint_file(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = _list([str(k) for k in obj]) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: no state dict of tensors found (keys: {keys})")
    if not any(k.startswith(_MODEL_PREFIXES) for k in state) and any(k.startswith(_NESTED_PREFIX) for k in state):
        state = {k[len(_NESTED_PREFIX) :]: v for k, v in state.items() if k.startswith(_NESTED_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    stray = sorted(k for k in state if not k.startswith(_MODEL_PREFIXES))
    if stray:
        raise CheckpointError(f"{path}: tensors that are not part of a VQGAN: {_list(stray)}")
    model = VQGAN(infer_config(state, path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    problems = [f"{what} {_list(names)}" for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    if problems:
        raise CheckpointError(f"{path}: tensors do not match the inferred architecture: {'; '.join(problems)}")
    return model.to(device).eval().requires_grad_(False)


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def _list(names: list[str], most: int = 12) -> str:
    more = f" ... and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more

"""Checks a saved artifact before anything in it is loaded: manifest, hashes, versions, params, quantized planes."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from fxpress.errors import ArtifactError

log = logging.getLogger(__name__)

REQUIRED = ("format", "format_version", "backend", "target", "versions", "inputs", "library",
            "param_names", "files")


def read_manifest(folder: Path) -> dict:
    from fxpress.backends.artifact import FORMAT, FORMAT_VERSION, MANIFEST

    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder; a compiled model is saved as a folder with {MANIFEST}")
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}: not a saved fxpress model, or a truncated copy")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); the artifact is damaged: save it again") from err
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}; the artifact is damaged: save it again")
    if manifest["format"] != FORMAT or manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{path} is format {manifest['format']!r} v{manifest['format_version']}; "
                            f"this fxpress reads {FORMAT!r} v{FORMAT_VERSION}")
    _check_versions(path, manifest)
    return manifest


def _check_versions(path: Path, manifest: dict) -> None:
    from fxpress.backends.artifact import versions

    recorded = manifest["versions"]
    current = versions(manifest["backend"])
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{path} records versions as {type(recorded).__name__}, not an object")
    for name in sorted(set(current) - {"fxpress", "torch"}):  # the backend's own: tvm, onnxruntime
        if recorded.get(name) != current[name]:
            raise ArtifactError(f"{path.parent} was compiled with {name} {recorded.get(name, '(unrecorded)')}, "
                                f"this machine has {current[name]}; recompile it with fxpress.compile")
    if recorded.get("fxpress") != current["fxpress"]:
        log.warning("%s was saved by fxpress %s; this is %s", path.parent, recorded.get("fxpress"),
                    current["fxpress"])


def verify_files(folder: Path, manifest: dict) -> None:
    """Every file the manifest lists exists and matches its sha256; the library is listed."""
    from fxpress.backends.artifact import sha256

    files = manifest["files"]
    if not isinstance(files, dict) or manifest["library"] not in files:
        raise ArtifactError(f"manifest of {folder} does not list its library {manifest['library']!r}")
    for name, digest in files.items():
        path = folder / name
        if Path(name).name != name:
            raise ArtifactError(f"manifest of {folder} names a file outside the folder: {name!r}")
        if not path.is_file():
            raise ArtifactError(f"{folder} is missing {name} (listed in the manifest); the copy is incomplete")
        if sha256(path) != digest:
            raise ArtifactError(f"{path} does not match the sha256 in the manifest: it was changed or "
                                f"truncated after saving")


def read_params(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        params = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"cannot read parameters {path}: {err}") from err
    missing = [name for name in names if name not in params]
    if missing:
        raise ArtifactError(f"{path} lacks parameters {', '.join(missing[:5])}")
    return params


def _expected_planes(layer: str, record: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of each plane a quantized layer's record implies; ArtifactError if the record is bad."""
    from fxpress.ops.quant import BITS, FORMS, packed_bytes

    try:
        bits, group, zero = record["bits"], record["group"], record["zero"]
        rows, features = int(record["out_features"]), int(record["in_features"])
        planes = record["planes"]
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"manifest: quantized layer {layer} has no valid {err}; the manifest is damaged: "
                            f"save the model again") from err
    if bits not in BITS or not isinstance(group, int) or group < 1 or zero not in FORMS or not isinstance(planes, dict):
        raise ArtifactError(f"manifest: quantized layer {layer} has bits={bits!r}, group={group!r}, zero={zero!r}; "
                            f"expected bits in {BITS}, a positive group, zero in {FORMS}")
    groups = -(-features // group)
    expected = {"codes": ("uint8", (rows, packed_bytes(groups * group, bits))), "scales": ("float32", (rows, groups))}
    if zero != "sym":
        expected["zeros"] = ("uint8" if zero == "int" else "float32", (rows, groups))
    if "codebook" in planes:
        expected["codebook"] = ("float32", (2 ** bits,))
    return expected


def check_quantized(folder: Path, manifest: dict, params: dict[str, np.ndarray]) -> None:
    """Each quantized layer's planes (manifest ``quantized``) are in the params with the dtype and shape its
    bits, group, zero kind and sizes imply; ArtifactError naming the layer and the plane otherwise."""
    from fxpress.backends.artifact import PARAMS

    layers = manifest.get("quantized", {})
    if not isinstance(layers, dict):
        raise ArtifactError(f"manifest of {folder}: `quantized` must be an object of layers")
    for layer, record in layers.items():
        expected = _expected_planes(layer, record)
        planes = record["planes"]
        extra = sorted(set(planes) - set(expected))
        if extra:
            raise ArtifactError(f"manifest of {folder}: quantized layer {layer} lists plane {extra[0]}, which a "
                                f"{record['zero']} {record['bits']}-bit layer does not have")
        for plane, (dtype, shape) in expected.items():
            entry = planes.get(plane)
            if not isinstance(entry, dict) or "name" not in entry:
                raise ArtifactError(f"manifest of {folder}: quantized layer {layer} lacks its {plane} plane")
            if entry.get("dtype") != dtype or tuple(entry.get("shape", ())) != shape:
                raise ArtifactError(f"manifest of {folder}: quantized layer {layer}, plane {plane} is recorded as "
                                    f"{entry.get('dtype')}{entry.get('shape')}, but bits={record['bits']}, "
                                    f"group={record['group']}, zero={record['zero']} need {dtype}{list(shape)}")
            stored = params.get(entry["name"])
            if stored is None:
                raise ArtifactError(f"{folder / PARAMS}: quantized layer {layer} lacks plane {plane} "
                                    f"({entry['name']})")
            if str(stored.dtype) != dtype or tuple(stored.shape) != shape:
                raise ArtifactError(f"{folder / PARAMS}: quantized layer {layer}, plane {plane} ({entry['name']}) "
                                    f"is {stored.dtype}{list(stored.shape)}, expected {dtype}{list(shape)}")


def stored_bytes(path: Path) -> dict[str, int]:
    """Bytes each tensor occupies in a safetensors file, read from the file's header (its data offsets)."""
    with open(path, "rb") as handle:
        try:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path} has no readable safetensors header: {err}") from err
    return {name: int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}

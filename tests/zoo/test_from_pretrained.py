"""Your own Hugging Face model: `from_pretrained` on folders written by `save_pretrained` (five
architectures) and on a GGUF file, `fxpress capture DIR` exact, and one clear line for bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fxpress
from fxpress.cli import main
from fxpress.errors import ZooError
from fxpress.zoo import from_pretrained
from hf_factories import ARCHITECTURES, save_tiny, tiny_model

TASKS = {"llama": "causal-lm", "qwen2": "causal-lm", "gemma3": "causal-lm", "bert": "embedding",
         "vit": "classification"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: save_tiny(arch, root / arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folder_loads_as_a_zoo_model_and_captures_exactly(folders, arch):
    model = from_pretrained(folders[arch])
    assert model.task == TASKS[arch] and model.name == arch
    assert (model.tokenizer is None) == (arch == "vit")
    reference = tiny_model(arch)
    assert all(torch.equal(a, b) for a, b in zip(model.module.model.state_dict().values(),
                                                 reference.state_dict().values()))
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=model.dynamic_dims, name=model.name)
    assert graph.num_params == model.num_params
    with torch.no_grad():
        assert torch.equal(graph(*model.example_inputs), model.module(*model.example_inputs))
        wider = tuple(torch.cat([x, x, x]) for x in model.example_inputs)  # a batch of 6: dynamic by default
        assert torch.equal(graph(*wider), model.module(*wider))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cli_capture_of_a_folder_is_exact(folders, arch, capsys):
    assert main(["capture", str(folders[arch]), "--collapse", "2"]) == 0
    out = capsys.readouterr().out
    assert "# captured as" in out and "(equal)" in out and "max abs error 0" in out


def test_task_can_be_chosen_and_bad_tasks_are_refused(folders):
    assert from_pretrained(folders["bert"], task="embedding").task == "embedding"
    with pytest.raises(ZooError, match="unknown task 'translation'.*tasks: classification, embedding, causal-lm"):
        from_pretrained(folders["bert"], task="translation")


def _unsupported_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "not-a-real-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case", ["missing", "no-config", "not-gguf", "unsupported-gguf"])
def test_bad_model_paths_are_one_line_with_exit_status_2(tmp_path, case, capsys):
    if case == "missing":
        path, expected = tmp_path / "nowhere", "MODEL is a zoo name"
    elif case == "no-config":
        (tmp_path / "weights.bin").write_bytes(b"")
        path, expected = tmp_path, "has no config.json, so it is not a Hugging Face model folder"
    elif case == "not-gguf":
        path = tmp_path / "junk.gguf"
        path.write_bytes(b"not gguf at all")
        expected = "transformers cannot load junk.gguf"
    else:
        path, expected = _unsupported_gguf(tmp_path / "odd.gguf"), "transformers cannot load odd.gguf"
    assert main(["capture", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err


@pytest.mark.slow
def test_gguf_file_loads_as_float_without_its_quantization_settings(zoo_model):
    from fxpress.zoo import packages
    from fxpress.zoo.hf import SMOLLM2_GGUF

    gguf_path = packages.package_dir(packages.SMOLLM2, "test") / SMOLLM2_GGUF
    model = from_pretrained(gguf_path)
    assert model.task == "causal-lm" and model.tokenizer is not None
    assert getattr(model.module.model.config, "quantization_config", None) is None
    zoo = zoo_model("smollm2")
    ids = zoo.example_inputs[0]
    with torch.no_grad():
        assert torch.equal(model.module(ids), zoo.module(ids))

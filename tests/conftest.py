import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: a second intra-op thread only adds synchronization (and contention on a
# shared 2-core machine). Tests that run real models raise it themselves.
torch.set_num_threads(1)

# `make test` runs one pytest-xdist worker per core. The workers share the cores, so a worker keeps to its share
# of threads, whatever a test (or the trainer's `threads`) asks for, and so do the subprocesses tests start:
# OpenMP threads spinning on a core another worker holds slowed the SmolLM2 DPO test from 171 s to 1067 s.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    THREADS_PER_WORKER = max(1, len(os.sched_getaffinity(0)) // WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS_PER_WORKER)
    _set_num_threads = torch.set_num_threads
    torch.set_num_threads = lambda n: _set_num_threads(min(n, THREADS_PER_WORKER))


@pytest.fixture(scope="session")
def hf_smollm2(tmp_path_factory):
    """(tokenizer, model) as transformers reads SmolLM2-135M-Instruct's GGUF file (fp32, eval mode): the
    reference of the real-model parity tests. Reading the file this way takes most of a minute, so the test
    modules share one copy, and under xdist the first worker saves what transformers read (its config,
    tokenizer files and tensors) for the others to load in seconds."""
    transformers = pytest.importorskip("transformers")
    from llmlab.io.assets import AssetNotFoundError, asset_path

    try:
        path = asset_path("smollm2-135m-instruct")
    except AssetNotFoundError as e:
        pytest.skip(str(e))
    if WORKERS == 1:
        return _read_smollm2_gguf(transformers, path)
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "hf_smollm2"  # one folder for all workers of this run
    with FileLock(f"{shared}.lock"):
        if not (shared / "saved").is_file():
            tokenizer, model = _read_smollm2_gguf(transformers, path)
            tokenizer.save_pretrained(shared)  # save_pretrained refuses a model read from GGUF: config and tensors
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            (shared / "config.json").write_text(json.dumps(config))
            torch.save(model.state_dict(), shared / "state_dict.pt")
            (shared / "saved").touch()
            return tokenizer, model
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(shared),
                                                          dtype=torch.float32)
    model.load_state_dict(torch.load(shared / "state_dict.pt"))
    return transformers.AutoTokenizer.from_pretrained(shared), model.eval()


def _read_smollm2_gguf(transformers, path):
    """`from_pretrained(gguf_file=...)` insists on accelerate; without it we call the function it calls
    for llama files (`load_gguf_checkpoint`) on a model built from the config transformers reads."""
    import importlib.util

    folder, name = str(path.parent), path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if importlib.util.find_spec("accelerate"):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
        model = transformers.LlamaForCausalLM(config)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected
        model.tie_weights()
    return tokenizer, model.eval()

"""Documented claims that no other test file checks: the torch-version refusal of a foreign _C,
LAFS_FAST_BACKEND for the patch op, the reference ops without _C, the benchmarks' vectorised
baseline, and the main job end to end on ORL at a tiny budget. Each test first finds its claim in
the page that states it (README.md, docs/ops.md, docs/performance.md, bench/README.md), so a claim
cannot leave the docs while its test stays, nor the test while the claim stays."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lafs_fast import ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documented(page, claim):
    """The claim, as written (whitespace aside), is on the page this test checks it for."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = " ".join(f.read().split())
    assert " ".join(claim.split()) in text, f"{page} no longer states: {claim!r}"


def case(B=2, C=3, H=12, W=10, N=5, P=4, D=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    lm = torch.rand(B, N, 2, generator=g, dtype=dtype) * torch.tensor([W, H], dtype=dtype) * 1.2 - 1
    weight = torch.randn(D, P * P * C, generator=g, dtype=dtype) / (P * P * C) ** 0.5
    bias = torch.randn(D, generator=g, dtype=dtype)
    return images, lm, weight, bias


# ----------------------------------------------------------------------------- torch-version refusal
def test_extension_built_for_another_torch_refuses_to_load(monkeypatch):
    """docs/ops.md: "A binary built against another torch refuses to import, saying what to rebuild"."""
    documented("docs/ops.md", "A binary built against another torch refuses to import, saying what to rebuild.")
    from lafs_fast import _build_info
    from lafs_fast.ops._common import _load_extension as load_extension
    monkeypatch.setitem(_build_info.BUILD_INFO, "torch_version", "1.0.0+other")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0\+other but torch .* is installed: "
                                          r"rebuild it with `pip install --no-build-isolation \.`"):
        load_extension()
    monkeypatch.setitem(_build_info.BUILD_INFO, "torch_version", torch.__version__)
    assert load_extension()[0] == ops.HAS_EXTENSION   # the real build info loads as before


# ----------------------------------------------------------------------------- LAFS_FAST_BACKEND
def test_lafs_fast_backend_overrides_auto_for_the_patch_op(monkeypatch):
    """docs/ops.md: `auto` is cpu for CPU tensors and `LAFS_FAST_BACKEND` overrides it; an explicit
    backend wins over the variable; an unknown value is an error naming the variable."""
    documented("docs/ops.md", "`cpu` for CPU tensors; `LAFS_FAST_BACKEND` overrides it")
    documented("docs/ops.md",
               "(or an explicit `backend=`) wins over `auto`; an unknown value is an error naming the variable")
    cpu = torch.device("cpu")
    calls = []
    real = reference.landmark_patch_embed
    monkeypatch.setattr(reference, "landmark_patch_embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    images, lm, weight, bias = case(dtype=torch.float32)

    monkeypatch.setenv("LAFS_FAST_BACKEND", "reference")
    assert ops.resolve_backend("auto", cpu) == "reference"
    got = ops.landmark_patch_embed(images, lm, weight, bias, patch_size=4, perturb_std=1.0, seed=2)
    assert calls == [1]                                   # auto ran the reference op
    assert ops.resolve_backend("cpu", cpu) == "cpu"       # an explicit backend wins over the variable

    monkeypatch.setenv("LAFS_FAST_BACKEND", "cpu")
    assert ops.resolve_backend("auto", cpu) == "cpu"
    fused = ops.landmark_patch_embed(images, lm, weight, bias, patch_size=4, perturb_std=1.0, seed=2)
    assert calls == [1]                                   # ... and now the C++ op
    torch.testing.assert_close(fused, got, rtol=2e-5, atol=2e-5)

    monkeypatch.setenv("LAFS_FAST_BACKEND", "gpu-please")
    with pytest.raises(ValueError, match="LAFS_FAST_BACKEND must be one of .*'gpu-please'"):
        ops.landmark_patch_embed(images, lm, weight, bias, patch_size=4)
    monkeypatch.setenv("LAFS_FAST_BACKEND", "")           # empty = unset
    assert ops.resolve_backend("auto", cpu) == "cpu"


# ----------------------------------------------------------------------------- no _C
NO_EXTENSION_CHILD = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lafs_fast._C":
            raise ImportError("blocked by the test: no compiled extension")
        return None
sys.meta_path.insert(0, Block())
import warnings
warnings.filterwarnings("error", message="lafs_fast: using the slow")   # asked for: no fallback warning
import torch
from lafs_fast import ops, views
from lafs_fast.ops import counter_dropout, photometric
assert not ops.HAS_EXTENSION and "blocked by the test" in ops.EXTENSION_STATUS, ops.EXTENSION_STATUS
assert not hasattr(torch.ops.lafs_fast, "landmark_patch_embed")
inp = torch.load(sys.argv[1])
out = {}
leaves = [t.clone().requires_grad_() for t in inp["embed"]]
tokens = ops.landmark_patch_embed(*leaves, patch_size=4, index=inp["index"], perturb_std=1.5, seed=3)
tokens.backward(inp["cot"])
out["tokens"], out["grads"] = tokens.detach(), [t.grad for t in leaves]
out["patches"] = ops.landmark_patches(*inp["embed"][:2], patch_size=4, perturb_std=0.5, seed=4)
g, lg, l, ll, sw, sb, tw, tb = inp["multicrop"]
out["multicrop"] = ops.multicrop_embed(g, lg, l, ll, sw, sb, tw, tb, local_index=inp["local_index"],
                                       patch_size=4, perturb_std=1.0, seed=5)
out["dropout"] = counter_dropout(inp["x"], 0.3, 7)
out["photometric"] = photometric.apply_photometric(inp["views"], inp["params"], views.ViewConfig(size=8))
torch.save(out, sys.argv[2])
"""


@pytest.mark.slow  # a child process (~5 s)
def test_reference_ops_without_the_extension(tmp_path):
    """docs/ops.md: `reference` is "the oracle and the fallback": with lafs_fast._C unimportable and
    LAFS_FAST_BACKEND=reference, every public op still runs and gives the compiled ops' results."""
    documented("docs/ops.md", "| `reference` | plain PyTorch (`lafs_fast/reference.py`): the oracle and the fallback |")
    documented("docs/ops.md", "unless the reference ops are asked for by name (`LAFS_FAST_BACKEND=reference`")
    from lafs_fast import views
    from lafs_fast.ops import counter_dropout, photometric
    assert ops.HAS_EXTENSION, "this comparison needs the compiled ops in the parent"
    g = torch.Generator().manual_seed(1)
    f32 = [t.float() for t in case()]
    gi, glm, sw, sb = [t.float() for t in case(B=4, H=12, W=12, seed=2)]
    li, llm = [t.float() for t in case(B=4, H=8, W=8, seed=3)[:2]]
    vcfg = views.ViewConfig(size=8)
    x_views = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    inp = {"embed": f32, "index": torch.tensor([[0, 4, 4], [2, 1, 3]]), "cot": torch.randn(2, 3, 6, generator=g),
           "multicrop": [gi, glm, li, llm, sw, sb, torch.randn(7, 48, generator=g), torch.randn(7, generator=g)],
           "local_index": torch.randint(0, 5, (4, 3), generator=g), "x": torch.randn(5, 40, generator=g),
           "views": x_views,
           "params": photometric.draw_photometric_params(6, torch.full((6,), 0.5), torch.full((6,), 0.5),
                                                         vcfg, g, "cpu")}
    torch.save(inp, tmp_path / "in.pt")
    env = {**os.environ, "LAFS_FAST_BACKEND": "reference"}
    child = subprocess.run([sys.executable, "-c", NO_EXTENSION_CHILD,
                            str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                           capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert child.returncode == 0, child.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")

    # the same calls on the compiled (cpu) ops here
    tol = dict(rtol=2e-5, atol=2e-5)
    leaves = [t.clone().requires_grad_() for t in f32]
    tokens = ops.landmark_patch_embed(*leaves, patch_size=4, index=inp["index"], perturb_std=1.5, seed=3, backend="cpu")
    tokens.backward(inp["cot"])
    torch.testing.assert_close(got["tokens"], tokens.detach(), **tol)
    for a, t in zip(got["grads"], leaves):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["patches"], ops.landmark_patches(*f32[:2], patch_size=4, perturb_std=0.5, seed=4,
                                                                    backend="cpu"), **tol)
    want = ops.multicrop_embed(*inp["multicrop"], local_index=inp["local_index"], patch_size=4, perturb_std=1.0,
                               seed=5, backend="cpu")
    for a, b in zip(got["multicrop"], want):
        torch.testing.assert_close(a, b, **tol)
    assert torch.equal(got["dropout"], counter_dropout(inp["x"], 0.3, 7))   # bitwise: same mask function
    torch.testing.assert_close(got["photometric"],
                               photometric.apply_photometric(x_views, inp["params"], vcfg, backend="cpu"),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- benchmark baselines
def test_bench_baselines_compute_the_op_they_are_compared_with(monkeypatch):
    """bench/: the vectorised baseline (one grid_sample + F.linear), the original per-landmark
    loop and the bare GEMM compute what landmark_patch_embed computes, so the speed-ups in
    docs/performance.md compare equal work."""
    documented("bench/README.md", "vectorised (one `grid_sample` + `F.linear`), the original per-landmark loop, "
                                  "and the bare GEMM floor")
    documented("docs/performance.md", "Baselines (`bench/baselines.py`): `vectorised` is one `grid_sample` + "
                                      "`F.linear`, `original_loop` the release's per-landmark loop, `bare_gemm` "
                                      "the patch-embedding GEMM alone.")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import baselines
    images, lm, weight, bias = case(B=3, C=3, H=13, W=11, N=7, P=4, D=5)
    want = ops.landmark_patch_embed(images, lm, weight, bias, patch_size=4, backend="reference")
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(baselines.vectorised_patch_embed(images, lm, weight, bias, patch_size=4), want, **tol)
    torch.testing.assert_close(baselines.original_loop_patch_embed(images, lm, weight, bias, patch_size=4), want, **tol)
    patches = ops.landmark_patches(images, lm, patch_size=4, backend="reference")
    torch.testing.assert_close(baselines.bare_gemm(patches, weight, bias).view_as(want), want, **tol)
    # and the fused op the benchmark times (float32, C++)
    f = [t.float() for t in (images, lm, weight, bias)]
    torch.testing.assert_close(baselines.vectorised_patch_embed(*f, patch_size=4),
                               ops.landmark_patch_embed(*f, patch_size=4, backend="cpu"), rtol=2e-5, atol=2e-5)
    # gradients too (the benchmarks time forward + backward)
    a = [t.clone().requires_grad_() for t in (images, lm, weight, bias)]
    b = [t.clone().requires_grad_() for t in (images, lm, weight, bias)]
    cot = torch.randn_like(want)
    baselines.vectorised_patch_embed(*a, patch_size=4).backward(cot)
    ops.landmark_patch_embed(*b, patch_size=4, backend="reference").backward(cot)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- the main job
@pytest.mark.slow  # the three stages on ORL at 1 epoch each (12 s of CPU time)
def test_main_job_end_to_end_on_orl_at_a_tiny_budget(tmp_path):
    """`python -m lafs_fast.train` (the pipeline) at 1 epoch per stage: every stage's outputs,
    the final table with its three rows, results.json (README.md's quick start and results,
    docs/performance.md's main-job table)."""
    documented("README.md", "&& python -m lafs_fast.info && python -m lafs_fast.train\n")
    for page in ("README.md", "docs/performance.md"):
        documented(page, "| raw pixels, cosine (the floor) | 95.52 +- 0.67 % | 0.9269 | 52.0 % |")
    documented("docs/performance.md", "all 450 genuine + 4,500 impostor pairs")
    documented("docs/training.md", "stage 2, 20 epochs of LAFS pretraining on the 300 training-subject images")
    out = tmp_path / "pipeline"
    child = subprocess.run(
        [sys.executable, "-m", "lafs_fast.train", "--supervised-epochs", "1", "--pretrain-epochs", "1",
         "--finetune-epochs", "1", "--n-local", "1", "--out-dim", "64", "--head-hidden", "64",
         "--threads", "1", "--device", "cpu", "--progress", "false", "--out-dir", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert child.returncode == 0, child.stderr[-3000:]
    text = child.stdout
    for row in ("raw pixels (floor)", "Part fViT from scratch (2-shot)", "LAFS pretrained + finetuned (2-shot)"):
        assert row in text, text[-3000:]
    assert "450+4500" in text and "AUC" in text and "pipeline finished" in text
    for stage, final in (("1_supervised", "model.pt"), ("2_pretrain", "teacher.pt"), ("3_finetune", "model.pt")):
        files = os.listdir(out / stage)
        assert final in files and "metrics.jsonl" in files and any(f.startswith("step-") for f in files), (stage, files)
        lines = [json.loads(line) for line in open(out / stage / "metrics.jsonl")]
        assert lines and all(l.get("loss") is None or l["loss"] == l["loss"] for l in lines)   # no NaN
    results = json.loads((out / "results.json").read_text())
    reports = results["reports"]
    assert len(reports) == 3 and all(0.0 <= r["auc"] <= 1.0 and r["n_genuine"] == 450 for r in reports.values())
    assert round(reports["raw pixels (floor)"]["auc"], 4) == 0.9269
    # stage 2 trained on the 300 training-subject images (1 epoch, batch 30) from stage 1's landmark CNN
    assert results["pretrain"]["steps"] == 10

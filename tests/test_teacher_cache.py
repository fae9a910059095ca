"""The teacher's output cache (MODEL.DISTILL.TEACHER.CACHE_MB): training with it is training
without it, bit for bit, and it serves the batches whose inputs all came before."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tbd.config import ConfigError
from tbd.modeling.teacher_cache import TeacherOutputCache

from .conftest import make_batch, tiny_distill_cfg
from .test_families import pair_cfg


def _flipped(batch: list[dict]) -> list[dict]:
    return [{**x, "image": x["image"].flip(-1).contiguous()} for x in batch]


def _stream() -> list[list[dict]]:
    """Batches of 2 whose inputs repeat, as epochs with random flips do: all seen before, none,
    and half (a new image beside a known one)."""
    a, b, c = make_batch(2, seed=1), make_batch(2, seed=2), make_batch(2, seed=3)
    fa = _flipped(a)
    return [a, b, a, fa, b, [c[0], a[1]], fa, a, [c[0], a[1]], b]


@pytest.fixture(scope="module")
def plain_retinanet(tmp_path_factory):
    """RetinaNet with TBD trained on the stream without the cache: (config, model, losses)."""
    cfg = tiny_distill_cfg(tmp_path_factory.mktemp("plain"))
    return (cfg, *_train(cfg, _stream()))


def _train(cfg, stream) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    with EventStorage(0) as storage:
        for batch in stream:
            out = model(batch)
            opt.zero_grad()
            sum(out.values()).backward()
            opt.step()
            losses.append({k: v.item() for k, v in out.items()})
            storage.step()
    return model, losses


@pytest.mark.parametrize("family", ["RetinaNet", "FCOS"])
def test_training_with_the_cache_is_training_without_it(tmp_path, family, plain_retinanet):
    if family == "RetinaNet":  # HD + TFD
        cfg, plain, plain_losses = plain_retinanet
        cfg = cfg.clone()
    else:  # HD + TFD + PKD, with FCOS's centerness among the teacher's outputs
        cfg = pair_cfg(tmp_path, "FCOS", "FCOS", ["HD", "TFD", "PKD"])
        plain, plain_losses = _train(cfg, _stream())
    cfg.MODEL.DISTILL.TEACHER.CACHE_MB = 64.0
    cached, cached_losses = _train(cfg, _stream())
    assert plain.teacher_cache is None
    assert cached_losses == plain_losses  # every loss of every step, exactly
    for (name, p), q in zip(plain.state_dict().items(), cached.state_dict().values()):
        assert torch.equal(p, q), name
    # a, b, a (served), fa, b (served), [c0 a1], fa (served), a (served), [c0 a1] (served), b
    # (served)
    cache = cached.teacher_cache
    assert (cache.batches, cache.batches_served) == (10, 6)
    assert len(cache) == 7  # a, b, the flips of a, c0
    assert cache.stats()["served"] == pytest.approx(0.6)


def test_a_full_cache_takes_no_more_inputs_and_stays_right(plain_retinanet):
    cfg, _, plain_losses = plain_retinanet
    cfg = cfg.clone()
    cfg.MODEL.DISTILL.TEACHER.CACHE_MB = 64.0
    model, _ = _train(cfg, _stream()[:1])
    per_input = model.teacher_cache.used_bytes / 2
    # room for 3.5 inputs: a's two, then b's first; b's second does not fit
    cfg.MODEL.DISTILL.TEACHER.CACHE_MB = 3.5 * per_input / 2**20
    small, small_losses = _train(cfg, _stream())
    assert small.teacher_cache.full and len(small.teacher_cache) == 3
    assert small_losses == plain_losses
    # a batch is served only when both its inputs were kept: a, twice, of the 10
    assert small.teacher_cache.batches_served == 2


def test_keys_tell_inputs_apart():
    batch = make_batch(2, seed=1)
    k = TeacherOutputCache.keys(batch, (64, 64))
    assert k[0] != k[1] and TeacherOutputCache.keys(batch, (64, 64)) == k
    assert TeacherOutputCache.keys(_flipped(batch), (64, 64))[0] != k[0]
    assert TeacherOutputCache.keys(batch, (96, 64))[0] != k[0]  # padded differently


def test_not_used_with_distillers_that_read_the_teacher_heads_insides(tmp_path, caplog):
    cfg = pair_cfg(tmp_path, "RetinaNet", "RetinaNet", ["CrossKD"])
    cfg.MODEL.DISTILL.TEACHER.CACHE_MB = 64.0
    with caplog.at_level(logging.INFO, logger="tbd.modeling.meta_arch"):
        model = build_model(cfg)
    assert model.teacher_cache is None
    assert "CACHE_MB=64.0: not used" in caplog.text and "CrossKD" in caplog.text


@pytest.mark.parametrize("value", [-1.0, float("inf"), "64"])
def test_a_bad_size_is_refused_naming_the_key(tmp_path, value):
    cfg = tiny_distill_cfg(tmp_path)
    cfg.MODEL.DISTILL.TEACHER.CACHE_MB = value
    with pytest.raises(ConfigError, match="MODEL.DISTILL.TEACHER.CACHE_MB must be a number"):
        build_model(cfg)


NAN = float("nan")


def test_the_real_pair_check_compares_training_values_only(tmp_path):
    from tbd_benchmarks.teacher_cache_check import compare_metrics, same_weights

    def lines(path, rows):
        path.write_text("\n".join(json.dumps(r) for r in rows))
        return path

    plain = lines(tmp_path / "a.json", [
        {"iteration": 19, "total_loss": 2.5, "time": 0.30, "lr": 0.03},
        {"iteration": 39, "total_loss": 2.25, "time": 0.31, "memory/rss_mb": 900.0}])
    cached = lines(tmp_path / "b.json", [
        {"iteration": 19, "total_loss": 2.5, "time": 0.20, "lr": 0.03,
         "distill/teacher_cache_served": 0.0},
        {"iteration": 39, "total_loss": 2.25, "time": 0.21, "memory/rss_mb": 990.0,
         "distill/teacher_cache_served": 0.5}])
    for path in (plain, cached):  # an AP without its boxes is NaN in both: not a difference
        path.write_text(path.read_text() + "\n" + json.dumps({"iteration": 40, "bbox/APl": NAN}))
    m = compare_metrics(plain, cached)  # times, memory and the cache's own values differ only
    assert (m["num_differences"], m["iterations_compared"], m["served_share_at_end"]) == (0, 3, 0.5)
    off = lines(tmp_path / "c.json", [{"iteration": 19, "total_loss": 2.5, "lr": 0.03},
                                      {"iteration": 39, "total_loss": 2.2500001},
                                      {"iteration": 40, "bbox/APl": NAN}])
    m = compare_metrics(plain, off)
    assert m["num_differences"] == 1 and m["differences"][0]["key"] == "total_loss"
    w = {"a": torch.ones(2), "b": torch.zeros(3)}
    torch.save({"model": w}, tmp_path / "x.pth")
    torch.save({"model": {**w, "b": torch.tensor([0.0, 0.0, 1e-30])}}, tmp_path / "y.pth")
    assert same_weights(tmp_path / "x.pth", tmp_path / "x.pth") == {"tensors": 2, "differ": []}
    assert same_weights(tmp_path / "x.pth", tmp_path / "y.pth")["differ"] == ["b"]

"""Ray-free pre-training pieces against plain references: schedule, decay groups, step loss,
gradient accumulation, per-step masks, and the export round trip through timm / open_clip."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import mask_gen

from pipelines.lib.train.config import TrainConfig
from uta_core.config import load_config
from uta_core.models.export import export_student
from uta_core.models.open_clip_export import open_clip_visual
from uta_core.models.student import build_student
from uta_core.models.trained import load_export
from uta_core.objectives.alignment import ObjectiveConfig, StudentForward, draw_keep, prepare_student, step_loss
from uta_core.optim import OptimConfig, build_optimizer, build_scheduler, lr_at, param_groups, train_step


def nano(seed=0, out_dim=16):
    torch.manual_seed(seed)
    return build_student("nano", img_size=32, patch_size=4, out_dim=out_dim)


# --------------------------------------------------------------------- schedule
def hand_lr(step, base, low, warmup, total):
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    return low + 0.5 * (base - low) * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("warmup,total", [(3, 10), (0, 5), (4, 5)])
def test_lr_schedule_matches_hand_formula_and_drives_the_optimizer(warmup, total):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5)
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, warmup_steps=warmup, total_steps=total)
    for step in range(total):
        expected = hand_lr(step, 1e-3, 1e-5, warmup, total)
        got = lr_at(step, base_lr=1e-3, min_lr=1e-5, warmup_steps=warmup, total_steps=total)
        assert got == pytest.approx(expected)
        assert all(g["lr"] == pytest.approx(expected) for g in opt.param_groups)
        opt.step()
        sched.step()
    # The last step of the cosine reaches min_lr exactly at step == total.
    assert lr_at(total, base_lr=1e-3, min_lr=1e-5, warmup_steps=warmup, total_steps=total) == pytest.approx(1e-5)


def test_schedule_resolution_from_epochs_and_steps():
    assert TrainConfig(epochs=3, warmup_epochs=1).resolve(10) == (30, 10)
    assert TrainConfig(epochs=3, warmup_epochs=1, max_steps=7).resolve(10) == (7, 6)  # warm-up < total
    assert TrainConfig(max_steps=20, warmup_steps=2).resolve(10) == (20, 2)


def test_accumulation_reaches_the_global_batch_or_names_the_key():
    assert TrainConfig(micro_batch=4, global_batch=32).accumulation(world_size=2) == 4
    assert TrainConfig(micro_batch=4).accumulation(world_size=2) == 1
    with pytest.raises(ValueError, match="train.global_batch=30"):
        TrainConfig(micro_batch=4, global_batch=30).accumulation(world_size=2)


def test_unknown_objective_and_bad_optim_values_name_the_key():
    with pytest.raises(ValueError, match=r"name must be one of \['uta', 'fd', 'mim', 'uta_mim'\], got 'mae'"):
        load_config(ObjectiveConfig, None, ["name=mae"])
    with pytest.raises(ValueError, match="min_lr"):
        OptimConfig(lr=1e-4, min_lr=1e-3)


# --------------------------------------------------------------------- weight decay groups
@pytest.mark.parametrize("objective", ["uta", "mim"])
def test_no_decay_for_norms_biases_embeddings_and_frozen_mask_token(objective):
    student = nano()
    prepare_student(student, ObjectiveConfig(name=objective))
    decay, no_decay = param_groups(student, lr=1e-3, weight_decay=0.05, tower=None)
    names = {id(p): n for n, p in student.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    # Reference rule written out by name, independent of the implementation.
    for name, p in student.named_parameters():
        if name == "mask_token" and objective != "mim":
            assert name not in no_decay_names | decay_names  # frozen: not optimised at all
        elif p.ndim == 1 or "norm" in name or name.endswith("bias") or name in (
            "trunk.pos_embed", "trunk.cls_token", "mask_token"
        ):
            assert name in no_decay_names, name
        else:
            assert name in decay_names, name
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "trunk.patch_embed.proj.weight" in decay_names and "head.weight" in decay_names


# --------------------------------------------------------------------- the step loss
def slow_cosine_loss(pairs, weights):
    num = den = 0.0
    for (s, t), w in zip(pairs, weights):
        num += w * F.cosine_similarity(s, t, dim=0).item()
        den += w
    return -num / den


def reference_loss(student, images, teacher, keep, objective, cls_weight):
    """Per image and per token: student forward on one image, then a plain cosine loop."""
    pairs, weights = [], []
    N = student.num_patches
    for b in range(images.shape[0]):
        x = images[b : b + 1]
        if objective == "uta":
            out = student.forward_kept(x, keep[b : b + 1])[0]
            positions = [0] + [int(k) + 1 for k in keep[b]]
            for j, pos in enumerate(positions):
                pairs.append((out[j], teacher[b, pos]))
                weights.append(cls_weight if pos == 0 else 1.0)
        elif objective == "fd":
            out = student(x)[0]
            for pos in range(1 + N):
                pairs.append((out[pos], teacher[b, pos]))
                weights.append(cls_weight if pos == 0 else 1.0)
        else:
            masked = set(range(N)) - {int(k) for k in keep[b]}
            mask = torch.tensor([[i in masked for i in range(N)]])
            out = student.forward_masked(x, mask)[0]
            for i in sorted(masked):
                pairs.append((out[i + 1], teacher[b, i + 1]))
                weights.append(1.0)
    return slow_cosine_loss(pairs, weights)


@pytest.mark.parametrize("objective", ["uta", "fd", "mim"])
def test_step_loss_matches_a_per_image_reference(objective):
    student = nano().eval()
    cfg = ObjectiveConfig(name=objective, cls_weight=2.0)
    images = torch.randn(3, 3, 32, 32)
    teacher = torch.randn(3, 1 + 64, 16)
    keep = draw_keep(mask_gen("block_reversed", (8, 8), 0.5), 3, seed=0, rank=0, step=0)
    with torch.no_grad():
        got = step_loss(StudentForward(student, cfg), images, teacher, keep, cfg).item()
        expected = reference_loss(student, images, teacher, keep, objective, 2.0)
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("objective", ["uta", "fd", "mim"])
def test_every_trainable_parameter_gets_a_gradient(objective):
    # DDP refuses parameters without a gradient; prepare_student freezes what an objective skips.
    student = nano()
    cfg = ObjectiveConfig(name=objective)
    prepare_student(student, cfg)
    keep = draw_keep(mask_gen("random", (8, 8), 0.5), 2, seed=0, rank=0, step=0)
    step_loss(StudentForward(student, cfg), torch.randn(2, 3, 32, 32), torch.randn(2, 65, 16), keep, cfg).backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_masks_are_reproducible_per_rank_and_step_and_differ_across_them():
    gen = mask_gen("random", (8, 8), 0.5)
    a = draw_keep(gen, 4, seed=1, rank=0, step=5)
    assert torch.equal(a, draw_keep(gen, 4, seed=1, rank=0, step=5))
    assert not torch.equal(a, draw_keep(gen, 4, seed=1, rank=1, step=5))
    assert not torch.equal(a, draw_keep(gen, 4, seed=1, rank=0, step=6))
    assert not torch.equal(a, draw_keep(gen, 4, seed=1, rank=0, step=5, micro=1))


def test_accumulated_micro_batches_give_the_gradient_of_the_full_batch():
    cfg, optim = ObjectiveConfig(name="uta"), OptimConfig(lr=1e-3, grad_clip=0.0)
    images, teacher = torch.randn(4, 3, 32, 32), torch.randn(4, 65, 16)
    keep = draw_keep(mask_gen("random", (8, 8), 0.5), 4, seed=0, rank=0, step=0)
    grads, losses = [], []
    for chunks in (1, 2):
        student = nano(seed=3)
        prepare_student(student, cfg)
        opt = build_optimizer(student, optim)
        sched = build_scheduler(opt, optim, warmup_steps=0, total_steps=10)
        forward = StudentForward(student, cfg)
        micro = [lambda i=i, t=t, k=k: step_loss(forward, i, t, k, cfg)
                 for i, t, k in zip(images.chunk(chunks), teacher.chunk(chunks), keep.chunk(chunks))]
        out = train_step(forward, opt, sched, micro, chunks, grad_clip=0.0)
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
        losses.append(float(out["loss"]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_train_step_clips_the_global_gradient_norm():
    cfg, optim = ObjectiveConfig(name="fd"), OptimConfig(lr=1e-3, grad_clip=1e-3)
    student = nano()
    prepare_student(student, cfg)
    opt = build_optimizer(student, optim)
    sched = build_scheduler(opt, optim, warmup_steps=0, total_steps=10)
    keep = torch.arange(32).expand(2, -1)
    forward, images, teacher = StudentForward(student, cfg), torch.randn(2, 3, 32, 32), torch.randn(2, 65, 16)
    out = train_step(forward, opt, sched, [lambda: step_loss(forward, images, teacher, keep, cfg)], 1, grad_clip=1e-3)
    clipped = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]).norm().item()
    assert out["grad_norm"] > 1e-3  # the norm before clipping
    assert clipped == pytest.approx(1e-3, rel=1e-3)


# --------------------------------------------------------------------- export
def test_export_round_trip_through_timm_and_our_loader(tmp_path):
    student = nano(seed=7).eval()
    export_student(student, tmp_path, mean=(0.1, 0.2, 0.3), std=(0.9, 0.8, 0.7), extra={"step": 12})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected_tokens = student.trunk.forward_features(x)
        via_timm = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
        torch.testing.assert_close(via_timm.forward_features(x), expected_tokens)
        torch.testing.assert_close(via_timm(x), expected_tokens[:, 0])  # CLS pooling, no classifier
        assert via_timm.pretrained_cfg["mean"] == [0.1, 0.2, 0.3]
        loaded, meta = load_export(tmp_path)
        torch.testing.assert_close(loaded(x), student(x))
        torch.testing.assert_close(loaded.forward_kept(x, torch.arange(10).expand(2, -1)),
                                   student.forward_kept(x, torch.arange(10).expand(2, -1)))
        tower = open_clip_visual(tmp_path)
        torch.testing.assert_close(tower(x), student(x)[:, 0], atol=1e-5, rtol=1e-5)
    assert meta["step"] == 12 and meta["out_dim"] == 16


def test_export_of_a_named_variant_loads_with_the_plain_timm_name(tmp_path):
    import json

    from safetensors.torch import load_file

    torch.manual_seed(0)
    student = build_student("tiny", img_size=56, patch_size=14, out_dim=8, depth=2).eval()
    export_student(student, tmp_path, mean=(0.5,) * 3, std=(0.5,) * 3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "eva02_tiny_patch14_224"
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    model.load_state_dict(load_file(tmp_path / "model.safetensors"))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), student.trunk.forward_features(x))

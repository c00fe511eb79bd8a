"""The shapes CLIP's ResNet image tower (open_clip's ModifiedResNet: our weights load into it by
name) from a `train-clip` run's newest checkpoint, EMA weights, and its per-stage feature maps.
Shared by the check scripts that look inside the tower."""
import os
import torch, yaml
from open_clip.modified_resnet import ModifiedResNet
from safetensors.torch import load_file

STAGES = ["layer1", "layer2", "layer3", "layer4"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def newest_checkpoint(run):
    """The run's newest complete checkpoint directory (a `step-*` with meta.json, as the runtime's
    `--resume auto` takes it)."""
    root = os.path.join(run, "checkpoints")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.isfile(os.path.join(root, d, "meta.json")))
    assert steps, f"no complete checkpoint in {root}"
    return os.path.join(root, steps[-1])


def load(run):
    """The tower of the run's config, in evaluation mode (BatchNorm's running statistics), with the
    pixel normalisation it was trained with (`data.image.normalize`, as `train-clip` reads it)."""
    cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    model = cfg["model"]
    v = model["vision"]
    tower = ModifiedResNet(v["resnet_layers"], model["embed_dim"], v["heads"], v["image_size"], v["width"])
    weights = load_file(os.path.join(newest_checkpoint(run), "ema.safetensors"))
    tower.load_state_dict({k[len("visual."):]: t for k, t in weights.items() if k.startswith("visual.")})
    tower.image_size = v["image_size"]
    tower.normalize = cfg.get("data", {}).get("image", {}).get("normalize", "minus_one_one")
    assert tower.normalize in ("minus_one_one", "clip"), f"{run}: unknown data.image.normalize {tower.normalize}"
    return tower.eval()


def pixels(tower, images, channels_last=True):
    """0..255 images ([B, S, S, 3], or [B, 3, S, S] with channels_last=False; differentiable) → the
    tower's input, normalised as it was trained: x / 127.5 - 1 (the runtime's default, the shapes
    CLIP) or CLIP's per-channel mean and std."""
    x = torch.as_tensor(images)
    x = (x.permute(0, 3, 1, 2) if channels_last else x).float()
    return (x / 255 - MEAN) / STD if tower.normalize == "clip" else x / 127.5 - 1


def stage_features(tower, images, stages=len(STAGES)):
    """images: uint8 [B, S, S, 3] at the tower's size → the first `stages` stages' outputs, in order."""
    x = pixels(tower, images)
    out = []
    with torch.no_grad():
        h = tower.stem(x)
        for name in STAGES[:stages]:
            h = getattr(tower, name)(h)
            out.append(h)
    return out

"""Check (prints only, not a benchmark): a random-init Ultralytics YOLOv8n DetectionModel (from its yaml, no weights)
prunes at 50 % uniform channel sparsity: MACs kept, counter == plan cost, pruned == zeroed on the head outputs.
Needs `pip install ultralytics` (optional). Run: PYTHONPATH=$PWD python benchmarks/check_yolo_partitions.py [yolov8n.yaml|yolo11n.yaml]
"""
import sys
import torch, torch.nn as nn
from ultralytics.nn.tasks import DetectionModel
from pruning_env.pruning import Pruner, zeroed_copy
from pruning_env.costs import count_costs
torch.manual_seed(0)
m = DetectionModel(sys.argv[1] if len(sys.argv) > 1 else 'yolov8n.yaml', verbose=False).eval()
for mod in m.modules():  # non-trivial BN statistics, so slicing errors show
    if isinstance(mod, nn.BatchNorm2d):
        mod.running_mean.uniform_(-0.5, 0.5); mod.running_var.uniform_(0.5, 2.0)
        mod.weight.data.uniform_(0.5, 1.5); mod.bias.data.uniform_(-0.2, 0.2)
for p in m.parameters(): p.requires_grad_(False)
x = torch.randn(1, 3, 224, 224)
L = len(m.model) - 1; head = m.model[-1]
outs = [f"model.{L}.{b}.{i}.2" for b in ("cv2", "cv3") for i in range(head.nl)]
pr = Pruner(m, x, ignore=[f"model.{L}.dfl.conv"] + outs)
pr.compute_importance(criterion="l1")
def raw(model):
    got = {}
    hs = [model.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: got.__setitem__(n, o)) for n in outs]
    with torch.no_grad(): model(x)
    for h in hs: h.remove()
    return got
for sp in (0.5,):
    plan = pr.plan(sparsity=sp); new = pr.apply(plan)
    full = pr.plan_cost(keep=pr.num_channels).macs; cost = pr.plan_cost(plan)
    print(f"sparsity {sp}: groups {pr.n_groups}, MACs kept {cost.macs / full:.3f}, counter == plan {count_costs(new, (3, 224, 224)) == cost}")
    a, b, o = raw(new), raw(zeroed_copy(m, pr, plan)), raw(m)
    print("head outputs max|pruned-zeroed|", max(float((a[n] - b[n]).abs().max()) for n in outs),
          "max|zeroed|", max(float(b[n].abs().max()) for n in outs),
          "max|zeroed-unpruned| (teeth)", max(float((o[n] - b[n]).abs().max()) for n in outs))
frozen = [s for s in pr.graph.specs if all(g is None for g in [seg.source for seg in (pr.graph.specs[s].out_layout or ())])]
print("layers with frozen outputs:", len(frozen), frozen[:12])

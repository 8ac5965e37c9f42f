import torch, torchao
from torchao.quantization import quantize_, Float8DynamicActivationFloat8WeightConfig, PerRow
m = torch.nn.Linear(256, 256, bias=False).cuda().bfloat16()
quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
print("torchao", torchao.__version__, "ok", m(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)).shape)

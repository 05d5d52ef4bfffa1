"""fp32 GEMM rate of one core through torch (a proxy for the FMA peak)."""
import torch, time
torch.set_num_threads(1)
a=torch.randn(1024,1024); b=torch.randn(1024,1024)
for _ in range(3): a@b
ts=[]
for _ in range(10):
    t=time.perf_counter(); a@b; ts.append(time.perf_counter()-t)
print("sgemm 1 thread GF/s", 2*1024**3/min(ts)/1e9)

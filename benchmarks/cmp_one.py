"""Quick side-by-side probe: python benchmarks/cmp_one.py THREADS S D H CAUSAL [f32|bf16|f16]."""
import numpy as np, flash_attn_c as fa, time, sys, torch, statistics, ml_dtypes
nt=int(sys.argv[1]); s=int(sys.argv[2]); d=int(sys.argv[3]); h=int(sys.argv[4]); causal=int(sys.argv[5]); dt=sys.argv[6] if len(sys.argv)>6 else 'f32'
fa.set_num_threads(nt); torch.set_num_threads(nt)
npdt={'f32':np.float32,'bf16':ml_dtypes.bfloat16,'f16':np.float16}[dt]; tdt={'f32':torch.float32,'bf16':torch.bfloat16,'f16':torch.float16}[dt]
rng=np.random.default_rng(0)
q,k,v=(rng.standard_normal((1,s,h,d)).astype(np.float32).astype(npdt) for _ in range(3))
tq,tk,tv=(torch.from_numpy(x.astype(np.float32)).to(tdt).transpose(1,2).contiguous() for x in (q,k,v))
f=lambda: fa.flash_attn_func(q,k,v,causal=bool(causal))
g=lambda: torch.nn.functional.scaled_dot_product_attention(tq,tk,tv,is_causal=bool(causal))
f();g()
r=[];a=[];b=[]
for _ in range(7):
    t0=time.perf_counter();f();t1=time.perf_counter();g();t2=time.perf_counter()
    r.append((t2-t1)/(t1-t0));a.append(t1-t0);b.append(t2-t1)
fl=4*h*s*s*d/(2 if causal else 1)
print(f"nt{nt} s{s} d{d} h{h} c{causal} {dt}: ours {fl/statistics.median(a)/1e9:.1f} GF/s torch {fl/statistics.median(b)/1e9:.1f} ratio {statistics.median(r):.2f}")

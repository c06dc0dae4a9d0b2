"""verify_exports before and after the one-pass change, on the cpu DPO run's six files, 100 pairs."""
import json, sys, time
from pathlib import Path
from dpo_lib.deploy import gguf_check as new
from dpo_lib.deploy import _old_gguf_check as old
from dpo_lib.core.machine import peak_rss_mb
RUN, SFT = Path("runs/cpu-dpo"), Path("runs/cpu-sft")
quants = ["q8_0", "q4_k_m", "q3_k_m", "q2_k"]
files = {"merged": RUN / "export/merged", "f16": RUN / "export/model-f16.gguf",
         **{q: RUN / f"export/model-{q}.gguf" for q in quants}}
ref = {k: SFT / str(v.relative_to(RUN)) for k, v in files.items()}
out = {}
for name, mod in [(sys.argv[1], new if sys.argv[1] == "new" else old)]:
    t = time.perf_counter()
    table = mod.verify_exports(RUN, files, ref, n_pairs=100, runtime=False, progress=False)
    out = {"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(),
           "table": table.to_dict(), "right": table.attrs["right"]}
    print(name, out["seconds"], flush=True)
    print(table.to_string())
Path(f"/tmp/verify_{sys.argv[1]}.json").write_text(json.dumps(out, default=float))

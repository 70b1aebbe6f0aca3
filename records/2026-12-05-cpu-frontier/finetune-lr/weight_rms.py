"""RMS of each pretrained model's token embedding and hidden matrices (the mean over the
encoder's 2-D weights other than embeddings), read from its model.safetensors.
Usage: python weight_rms.py MODEL_DIR [MODEL_DIR ...]"""
import glob
import sys

from safetensors.torch import load_file

print("| model | token embedding RMS | hidden matrices: mean RMS (count) |")
print("|---|---|---|")
for d in sys.argv[1:]:
    sd = {}
    for f in sorted(glob.glob(f"{d}/*.safetensors")):
        sd.update(load_file(f))
    emb = [v for k, v in sd.items() if v.ndim == 2 and v.shape[0] > 50_000]  # the (vocab, d) table(s)
    mats = [v for k, v in sd.items() if v.ndim == 2 and v.shape[0] < 50_000 and "embed" not in k and "head" not in k]
    rms = lambda v: v.float().pow(2).mean().sqrt().item()
    print(f"| {d} | {rms(emb[0]):.4f} | {sum(map(rms, mats)) / len(mats):.4f} ({len(mats)}) |")

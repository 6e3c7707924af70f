# MCTF-S (r = 16 at blocks 1-11: the paper's classification setting; for detection and segmentation the r0.35-loc3-6-9
# leaf is faster, see configs/README.md) in place of DeiT-S; all else is the baseline's.
_base_ = "../deit/upernet_deit-small_mln_8xb2-160k_ade20k-512x512.py"
model = dict(backbone=dict(model_name="mctf_small", model_kwargs=dict(r=16)))

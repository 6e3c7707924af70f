# MCTF-S with the dense setting (35% of the patch tokens merged at blocks 3, 6 and 9, as MCTF-Fast; chosen by
# measurement, configs/README.md) in place of DeiT-S; all else is the baseline's.
_base_ = "../deit/upernet_deit-small_mln_8xb2-160k_ade20k-512x512.py"
model = dict(backbone=dict(model_name="mctf_small", model_kwargs=dict(r=0.35, reduction_loc=(3, 6, 9))))

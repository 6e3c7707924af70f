# MCTF-S (r = 16 at blocks 1-11: the paper's classification setting; for detection and segmentation the r0.35-loc3-6-9
# leaf is faster, see configs/README.md) in place of DeiT-S; all else is the baseline's.
_base_ = "../deit/mask-rcnn_deit-small_sfp_8xb2-lsj-100e_coco.py"
model = dict(backbone=dict(model_name="mctf_small", model_kwargs=dict(r=16)))

# EViT-S (keep rate 0.7 at blocks 3, 6, 9: the paper's setting) in place of DeiT-S; all else is the baseline's.
_base_ = "../deit/mask-rcnn_deit-small_sfp_8xb2-lsj-100e_coco.py"
model = dict(backbone=dict(model_name="evit_small", model_kwargs=dict(keep_rate=0.7)))

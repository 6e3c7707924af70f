# Sparsifiner-S (attention keep rate 0.25 in every block: the official default) in place of DeiT-S; all else is the
# baseline's. The connectivity predictors are not in the DeiT-S weights: they start at random (the log lists them);
# load a Sparsifiner checkpoint for trained ones.
_base_ = "../deit/upernet_deit-small_mln_8xb2-160k_ade20k-512x512.py"
model = dict(backbone=dict(model_name="sparsifiner_small", model_kwargs=dict(attn_keep_rate=0.25)))

# Sparsifiner-S (attention keep rate 0.25 in every block: the official default) in place of DeiT-S; all else is the
# baseline's (trained from scratch). The connectivity predictors stay frozen at their random initialization: only the
# predictor phase of tokenzoo.sparsifiner.set_training_phase trains them.
_base_ = "../deit/upernet_deit-small_mln_1xb2-200i_synthetic.py"
model = dict(backbone=dict(model_name="sparsifiner_small", model_kwargs=dict(attn_keep_rate=0.25)))

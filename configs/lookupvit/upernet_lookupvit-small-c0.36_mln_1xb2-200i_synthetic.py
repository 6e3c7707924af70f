# LookupViT-S (compressed grid 0.36 of the lookup grid's side: the paper's 5x5 at 224, 12x12 at 512, 23x23 at 1024)
# in place of DeiT-S; all else is the baseline's. The DeiT-S weights warm-start the parts LookupViT shares with DeiT.
_base_ = "../deit/upernet_deit-small_mln_1xb2-200i_synthetic.py"
model = dict(backbone=dict(model_name="lookupvit_small", model_kwargs=dict(compressed_size=0.36)))

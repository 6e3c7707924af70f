# Expedit-S in place of DeiT-S, all else the baseline's: the paper's ViT-L setting scaled to 12 blocks (clustering
# after block 4 into 0.7 of each side of the patch grid, CLS kept; 5 soft k-means rounds in 5x5 windows, temperature
# 0.02; k = 20 nearest clusters, temperature 0.02, for reconstruction). At 128x128, 6x6 clusters of the 8x8 grid.
# Block 2 gives its own map; the maps of blocks 5, 8 and 11 are rebuilt on the full grid by the token reconstruction
# layer.
_base_ = "../deit/upernet_deit-small_mln_1xb2-200i_synthetic.py"
model = dict(backbone=dict(model_name="expedit_small", model_kwargs=dict(cluster_loc=4, num_clusters=0.7)))

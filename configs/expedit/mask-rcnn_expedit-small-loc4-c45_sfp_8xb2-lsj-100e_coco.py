# Expedit-S in place of DeiT-S, all else the baseline's: the paper's ViT-L setting scaled to 12 blocks (clustering
# after block 4 into 0.7 of each side of the patch grid, CLS kept; 5 soft k-means rounds in 5x5 windows, temperature
# 0.02; k = 20 nearest clusters, temperature 0.02, for reconstruction). At 1024x1024, 45x45 clusters of the 64x64 grid.
# The map of block 11 is rebuilt on the full grid by the token reconstruction layer.
_base_ = "../deit/mask-rcnn_deit-small_sfp_8xb2-lsj-100e_coco.py"
model = dict(backbone=dict(model_name="expedit_small", model_kwargs=dict(cluster_loc=4, num_clusters=0.7)))

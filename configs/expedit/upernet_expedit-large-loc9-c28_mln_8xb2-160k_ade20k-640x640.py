# Expedit-L on ADE20K at 640x640 with the paper's main setting (Segmenter ViT-L/16; the official
# configs/segmenter_hourglass_vit/segmenter-hourglass-vit-l16_640x640_160k_ade20k.py): clustering after block 9 of 24
# into 28x28 clusters of the 40x40 grid (0.7 of each side), 5 soft k-means rounds in 5x5 windows, temperature 0.02;
# reconstruction from the k = 20 nearest clusters, temperature 0.02. ViT-L/16 AugReg weights, as the official configs.
# Differences from the paper's model: UperNet with a multi-level neck, as every family here, instead of Segmenter's
# mask transformer head; so block 5 gives its own map and the maps of blocks 11, 17 and 23 are rebuilt on the full
# grid by the token reconstruction layer (the paper's Segmenter reconstructs its head's logits instead). The paper
# measures a trained Segmenter with clustering switched on at test time; this config trains with it on.
_base_ = [
    "../_base_/models/upernet_vit-l16_mln.py",
    "../_base_/datasets/ade20k_640x640.py",
    "../_base_/schedules/schedule_160k.py",
    "../_base_/default_runtime.py",
]
model = dict(backbone=dict(
    model_name="expedit_large",
    model_kwargs=dict(cluster_loc=9, num_clusters=0.7, cluster_iters=5, cluster_window=5, cluster_temperature=0.02,
                      recon_k=20, recon_temperature=0.02),
))

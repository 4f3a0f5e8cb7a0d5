"""Evaluation: the numbers of the paper's tables, each computed one documented way.

* ``fidelity``       FID / IS through torch-fidelity (rFID, gFID), with the protocol recorded beside
                     every number; reference statistics cached as .npz; the ``mergevq fid`` command.
* ``demo_classifier`` a small digits CNN registered in torch-fidelity as the "demo-classifier"
                     feature extractor (the demo's stand-in for Inception, which needs weights).
* ``reconstruction`` per-image PSNR, SSIM and LPIPS (VGG16 trunk from a local file).
* ``flops``          multiply-accumulate counts (Table A1) with torch's FlopCounterMode.
* ``linear_probe``   the MAE linear-probing protocol of App. A.4.
* ``bootstrap``      percentile bootstrap intervals of accuracies, paired between two encoders.
"""

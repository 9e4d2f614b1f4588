"""Save a tiny random-weight Stable Diffusion model folder, for trying the CLI offline.

python scripts/make_tiny_model.py tiny-sd            # SD 1.x architecture, 256 px images
python scripts/make_tiny_model.py tiny-sdxl --kind sdxl
python scripts/make_tiny_model.py tiny-sd3 --kind sd3  # also sd35 and pixart: 128 px images
python scripts/make_tiny_model.py tiny-flux --kind flux  # also flux-fill: ask for 128 px
python scripts/make_tiny_model.py tiny-wan --kind wan  # also wan-i2v, wan-v2v, wan22: 128 px, 17 frames
python scripts/make_tiny_model.py tiny-wan-5b --kind wan22-5b  # 256 px, 17 frames
agentsd generate --model tiny-sd --prompt "a cat" --steps 20 --compare --out out

The UNets' default latent is 64x64 (256 px images: the tiny VAE downsamples 4x), so the top
level has 4096 tokens, as SD 1.5 at 512 px: there agent attention pays off even in a toy UNet
(about 2x with --compare on a 2-core CPU). At the tiny UNet's smallest sizes (64 px, 256
tokens) the matching costs more than it saves and agentsd is no faster than the baseline.

The diffusion transformers (sd3, sd35, pixart) default to a 32x32 latent: 128 px images and a
16x16 patch grid (256 tokens); 256 px images give 32x32 (1024). PixArt-Sigma snaps sizes to its
resolution bins unless called with use_resolution_binning=False: at latent 32 the 256 px bins, so
256x256 runs as asked while 128 px runs at 256 and is resized (with a latent of 64, the 512 px bins).

Flux (flux, flux-fill) has the same 16x16 token grid at 128 px, but its pipelines default to 512 px
whatever the model (a 64x64 grid): ask for --width 128 --height 128. FluxPipeline.from_pretrained
(or FluxFillPipeline's) loads the folder offline.

Wan (wan, wan-i2v, wan-v2v, wan22, wan22-5b) makes videos: ask for 128 x 128 px and 17 frames (Wan
wants 4 k + 1), a 5 x 8 x 8 token grid; wan22-5b's VAE compresses 16x in space, so 256 x 256 px
there. Its pipelines default to 480 x 832 px and 81 frames whatever the model, so the size is only
the one to ask for (--latent does not apply). wan-i2v also takes an image and prompts padded to 512
tokens (max_sequence_length=512); wan-v2v takes a video (its frames) and a strength; diffusers'
pipelines for those two need ftfy to encode a prompt. DiffusionPipeline.from_pretrained loads the
folder offline, as the kind's pipeline class (WanPipeline, WanImageToVideoPipeline, ...).
"""

import argparse

from agentsd.testing import FLUX_KINDS, KINDS, TRANSFORMER_KINDS, WAN_KINDS, tiny_pipeline

DEFAULT_LATENT = {**dict.fromkeys(KINDS, 64), **dict.fromkeys(TRANSFORMER_KINDS, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--kind", choices=KINDS + TRANSFORMER_KINDS + WAN_KINDS, default="sd15")
    parser.add_argument(
        "--latent", type=int, help="default latent side; the image is 4x larger (default: 64, transformers 32)"
    )
    args = parser.parse_args()
    if args.kind in WAN_KINDS:
        if args.latent:
            parser.error("--latent does not apply to the Wan kinds: their size is asked for when called")
        from agentsd.testing import tiny_wan

        tiny_pipeline(args.kind).save_pretrained(args.folder)
        side = tiny_wan.CALL_KWARGS[args.kind]["height"]
        print(f"saved a tiny {args.kind} pipeline to {args.folder} (ask for {side} px, {tiny_wan.FRAMES} frames)")
        return
    latent = args.latent or DEFAULT_LATENT[args.kind]
    tiny_pipeline(args.kind, sample_size=latent).save_pretrained(args.folder)
    # Flux pipelines read no default size from the model: the size is only the one to ask for.
    size = f"ask for {4 * latent} px images" if args.kind in FLUX_KINDS else f"{4 * latent} px images by default"
    print(f"saved a tiny {args.kind} pipeline to {args.folder} ({size})")


if __name__ == "__main__":
    main()

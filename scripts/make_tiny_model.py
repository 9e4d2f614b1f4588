"""Save a tiny random-weight Stable Diffusion model folder, for trying the CLI offline.

python scripts/make_tiny_model.py tiny-sd            # SD 1.x architecture, 256 px images
python scripts/make_tiny_model.py tiny-sdxl --kind sdxl
agentsd generate --model tiny-sd --prompt "a cat" --steps 20 --compare --out out

The default latent is 64x64 (256 px images: the tiny VAE downsamples 4x), so the top level
has 4096 tokens, as SD 1.5 at 512 px: there agent attention pays off even in a toy UNet
(about 2x with --compare on a 2-core CPU). At the tiny UNet's smallest sizes (64 px, 256
tokens) the matching costs more than it saves and agentsd is no faster than the baseline.
"""

import argparse

from agentsd.testing import KINDS, tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--kind", choices=KINDS, default="sd15")
    parser.add_argument("--latent", type=int, default=64, help="default latent side; the image is 4x larger")
    args = parser.parse_args()
    tiny_pipeline(args.kind, sample_size=args.latent).save_pretrained(args.folder)
    print(f"saved a tiny {args.kind} pipeline to {args.folder} ({4 * args.latent} px images by default)")


if __name__ == "__main__":
    main()

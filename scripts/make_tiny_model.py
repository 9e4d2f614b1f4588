"""Save a tiny random-weight Stable Diffusion model folder, for trying the CLI offline.

python scripts/make_tiny_model.py tiny-sd            # SD 1.x architecture
python scripts/make_tiny_model.py tiny-sdxl --kind sdxl
agentsd generate --model tiny-sd --prompt "a cat" --compare --out out
"""

import argparse

from agentsd.testing import KINDS, tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--kind", choices=KINDS, default="sd15")
    parser.add_argument("--latent", type=int, default=16, help="default latent side; the image is 4x larger")
    args = parser.parse_args()
    tiny_pipeline(args.kind, sample_size=args.latent).save_pretrained(args.folder)
    print(f"saved a tiny {args.kind} pipeline to {args.folder}")


if __name__ == "__main__":
    main()

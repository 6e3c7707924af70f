"""``python -m tokenzoo.export MODEL --out file.onnx``: see ``tokenzoo.export.onnx_export``."""
import sys

from tokenzoo.export.onnx_export import main

if __name__ == '__main__':
    sys.exit(main())

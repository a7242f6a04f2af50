"""Where tfl's streamed input pipeline spends its time: images per core-second of one JPEG folder read at 224 px by
pipelines that each add one step of tfl's (the measurements behind docs/benchmarks.md#the-input-pipeline).

    nice -n 19 .venv/bin/python scripts/input_profile.py --images 512 --rounds 2

Each variant is a flat tf.data parallel map (AUTOTUNE) over the file paths, batched by 64 and prefetched, except
the last, which is tfl's StreamedImages in the seeded training order. Per core is images over the CPU seconds of
this process (every thread) while it drains the pipeline; the best of --rounds interleaved rounds counts. The folder
is the bench's (tfl.bench.write_jpeg_folder: crops of scikit-image's sample photos when it is installed).

The "DCT-scaled" variants decode with libjpeg's scaled IDCT (`decode_jpeg(ratio=k)`, k in 1, 2, 4, 8, the largest
that keeps both decoded sides >= --size) before the same antialiased resize: the last column is their mean
absolute difference (uint8 levels) from tfl's full decode + resize. Try larger sources with --sides 500 1200.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--sides", type=int, nargs=2, default=(256, 500), help="source width/height range, px")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from tfl.bench import write_jpeg_folder
    from tfl.data.decode import decode_files, decode_path, image_files
    from tfl.data.pipeline import StreamedImages, index_order, resize_uint8

    size, batch = args.size, 64
    with tempfile.TemporaryDirectory(prefix="tfl-input-profile-") as root:
        paths, source = write_jpeg_folder(root, args.images, tuple(args.sides), seed=0)
        n = len(paths)
        jpeg = lambda path: tf.io.decode_jpeg(tf.io.read_file(path), channels=3)  # noqa: E731

        def scaled(path, dct_method=""):
            # the largest ratio keeping both sides >= size (libjpeg's scaled output is ceil(side / ratio))
            data = tf.io.read_file(path)
            side = tf.reduce_min(tf.io.extract_jpeg_shape(data)[:2])
            index = tf.add_n([tf.cast((side + k - 1) // k >= size, tf.int32) for k in (2, 4, 8)])
            return tf.switch_case(index, [
                lambda k=k: tf.ensure_shape(tf.io.decode_jpeg(data, channels=3, ratio=k, dct_method=dct_method),
                                            [None, None, 3]) for k in (1, 2, 4, 8)])

        variants = {
            "decode_jpeg only": lambda p: jpeg(p)[:1, :1],
            "decode_jpeg + bilinear resize (the bare decoder)": lambda p: tf.image.resize(jpeg(p), [size, size]),
            "decode_jpeg + area resize": lambda p: tf.image.resize(jpeg(p), [size, size], method="area"),
            "decode_jpeg + antialiased bilinear resize": lambda p: tf.image.resize(jpeg(p), [size, size],
                                                                                   antialias=True),
            "tfl's decode_path + resize_uint8, flat": lambda p: tf.cast(resize_uint8(decode_path(p), size),
                                                                        tf.float32),
            "DCT-scaled decode_jpeg + resize_uint8": lambda p: tf.cast(resize_uint8(scaled(p), size), tf.float32),
            "DCT-scaled decode_jpeg (INTEGER_FAST) + resize_uint8": lambda p: tf.cast(
                resize_uint8(scaled(p, "INTEGER_FAST"), size), tf.float32),
        }
        reference = "tfl's decode_path + resize_uint8, flat"
        streamed = StreamedImages(image_files(decode_files(paths, np.zeros(n, np.int64), np.zeros(n, bool))), size)

        def make(name):
            if name == "tfl StreamedImages (per-batch map_fn)":
                return streamed.batches(index_order(n, batch, training=True, seed=0))
            ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths))
            fn = tf.autograph.experimental.do_not_convert(variants[name])
            return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)

        names = [*variants, "tfl StreamedImages (per-batch map_fn)"]
        best = dict.fromkeys(names, 0.0)
        pixels = {}
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for name in names:
                ds = make(name)
                start = cpu_seconds()
                compared = name == reference or name.startswith("DCT")
                batches = [b for b in ds] if compared else [None for _ in ds]
                best[name] = max(best[name], n / (cpu_seconds() - start))
                if compared:
                    pixels[name] = np.concatenate([b.numpy() for b in batches])
        print(f"{n} JPEGs of {args.sides[0]}-{args.sides[1]} px ({source}) at {size} px; "
              f"load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
        print("| pipeline | images per core-second | ms of CPU per image | mean abs diff from tfl's |")
        print("|---|---|---|---|")
        for name in names:
            diff = (f"{np.abs(pixels[name] - pixels[reference]).mean():.2f}"
                    if name.startswith("DCT") else "")
            print(f"| {name} | {best[name]:.0f} | {1000 / best[name]:.2f} | {diff} |")


if __name__ == "__main__":
    main()

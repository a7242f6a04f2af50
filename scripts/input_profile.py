"""Where tfl's streamed input pipeline spends its time: images per core-second of one JPEG folder read at 224 px by
pipelines that each add one step of tfl's (the measurements behind docs/benchmarks.md#the-input-pipeline).

    nice -n 19 .venv/bin/python scripts/input_profile.py --images 512 --rounds 2

Each variant is a flat tf.data parallel map (AUTOTUNE) over the file paths, batched by 64 and prefetched, except
the last, which is tfl's StreamedImages in the seeded training order. Per core is images over the CPU seconds of
this process (every thread) while it drains the pipeline; the best of --rounds interleaved rounds counts. The folder
is the bench's (tfl.bench.write_jpeg_folder: crops of scikit-image's sample photos when it is installed).
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
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from tfl.bench import write_jpeg_folder
    from tfl.data.decode import decode_files, decode_path, image_files
    from tfl.data.pipeline import StreamedImages, index_order, resize_uint8

    size, batch = args.size, 64
    with tempfile.TemporaryDirectory(prefix="tfl-input-profile-") as root:
        paths, source = write_jpeg_folder(root, args.images, (256, 500), seed=0)
        n = len(paths)
        jpeg = lambda path: tf.io.decode_jpeg(tf.io.read_file(path), channels=3)  # noqa: E731
        variants = {
            "decode_jpeg only": lambda p: jpeg(p)[:1, :1],
            "decode_jpeg + bilinear resize (the bare decoder)": lambda p: tf.image.resize(jpeg(p), [size, size]),
            "decode_jpeg + area resize": lambda p: tf.image.resize(jpeg(p), [size, size], method="area"),
            "decode_jpeg + antialiased bilinear resize": lambda p: tf.image.resize(jpeg(p), [size, size],
                                                                                   antialias=True),
            "tfl's decode_path + resize_uint8, flat": lambda p: tf.cast(resize_uint8(decode_path(p), size),
                                                                        tf.float32),
        }
        streamed = StreamedImages(image_files(decode_files(paths, np.zeros(n, np.int64), np.zeros(n, bool))), size)

        def make(name):
            if name == "tfl StreamedImages (per-batch map_fn)":
                return streamed.batches(index_order(n, batch, training=True, seed=0))
            ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths))
            fn = tf.autograph.experimental.do_not_convert(variants[name])
            return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)

        names = [*variants, "tfl StreamedImages (per-batch map_fn)"]
        best = dict.fromkeys(names, 0.0)
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for name in names:
                ds = make(name)
                start = cpu_seconds()
                for _ in ds:
                    pass
                best[name] = max(best[name], n / (cpu_seconds() - start))
        print(f"{n} JPEGs of 256-500 px ({source}) at {size} px; load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
        print("| pipeline | images per core-second | ms of CPU per image |\n|---|---|---|")
        for name in names:
            print(f"| {name} | {best[name]:.0f} | {1000 / best[name]:.2f} |")


if __name__ == "__main__":
    main()

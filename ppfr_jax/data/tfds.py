"""Training batches from a TFDS dataset (streamed, not random access): :class:`TfdsIterator`.

The dataset needs an image feature and a ``ClassLabel`` feature. Each process
reads its own even part of the split (``tfds.split_for_jax_process``),
shuffled with a buffer seeded by ``(seed, process_index)`` and repeated;
``start_step`` reproduces the stream by skipping (it reads what it skips).
Batches are those of :mod:`ppfr_jax.data.pipeline` (``image``, ``label``; no
landmarks). Errors: ``ValueError`` for a dataset without the features,
``BadRecordError`` for a damaged image or an out-of-range label.
"""
from __future__ import annotations

import jax

from ppfr_jax.data.pipeline import DTYPES, decode_image, flip_coin, step_name
from ppfr_jax.data.records import BadRecordError, import_tensorflow

tf = import_tensorflow()


class TfdsIterator:
    """Per-host batches from a TFDS dataset (streamed; resume replays ``start_step`` batches).

    Each process reads its own even part of the split
    (``tfds.split_for_jax_process``), shuffled with a buffer seeded by
    ``(seed, process_index)`` and repeated; deterministic, so ``start_step``
    reproduces the stream (by skipping, which reads the skipped records).
    """

    def __init__(self, name: str, split: str = "train", *, global_batch: int, seed: int = 0,
                 start_step: int = 0, data_dir: str | None = None, image_key: str = "image",
                 label_key: str = "label", flip: bool = True,
                 image_size: tuple[int, int] | None = (112, 112), output_dtype: str = "float32",
                 shuffle_buffer: int = 2048, process_index: int | None = None,
                 process_count: int | None = None, prefetch: int = 2):
        import tensorflow_datasets as tfds
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if global_batch <= 0 or global_batch % self.process_count:
            raise ValueError(f"global_batch {global_batch} must be a positive multiple of the "
                             f"{self.process_count} processes")
        builder = tfds.builder(name, data_dir=data_dir)
        feats = builder.info.features
        if image_key not in feats or label_key not in feats:
            raise ValueError(f"TFDS {name}: needs features {image_key!r} and {label_key!r}, has {list(feats)}")
        if not hasattr(feats[label_key], "num_classes"):
            raise ValueError(f"TFDS {name}: feature {label_key!r} is not a ClassLabel")
        self.num_classes = int(feats[label_key].num_classes)
        self.dataset_size = int(builder.info.splits[split].num_examples)
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // self.process_count
        self.steps_per_epoch = self.dataset_size // self.global_batch
        self.step = int(start_step)
        self.skipped: list[str] = []
        sub = tfds.split_for_jax_process(split, process_index=self.process_index,
                                         process_count=self.process_count)
        ds = builder.as_dataset(split=sub, shuffle_files=False,
                                decoders={image_key: tfds.decode.SkipDecoding()})
        ds = ds.repeat().shuffle(shuffle_buffer, seed=(int(seed) * 1_000_003 + self.process_index) % (2 ** 31),
                                 reshuffle_each_iteration=True)
        ds = ds.skip(self.step * self.local_batch)
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.range(self.step * self.local_batch, 2 ** 62)))
        dtype = DTYPES[output_dtype]
        pid = self.process_index
        n_classes = self.num_classes
        self.name = name

        @tf.autograph.experimental.do_not_convert
        def element(ex, pos):
            img = decode_image(ex[image_key])
            if image_size is not None:
                img = tf.cast(tf.round(tf.clip_by_value(
                    tf.image.resize(img, image_size, antialias=True), 0, 255)), tf.uint8)
            if flip:
                img = tf.cond(flip_coin(seed * 1009 + pid, pos), lambda: tf.reverse(img, [1]), lambda: img)
            img = img if dtype == tf.uint8 else tf.cast(tf.cast(img, tf.float32) / 127.5 - 1.0, dtype)
            label = tf.cast(ex[label_key], tf.int32)
            with tf.control_dependencies([tf.debugging.assert_non_negative(label, message="label < 0"),
                                          tf.debugging.assert_less(label, n_classes, message="label >= classes")]):
                label = tf.identity(label)
            return {"image": img, "label": label}

        ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.local_batch, drop_remainder=True).prefetch(prefetch)
        self._it = ds.as_numpy_iterator()

    def state(self) -> dict:
        return {"step": self.step, "skipped": 0}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        try:
            b = next(self._it)
        except tf.errors.OpError as e:  # a damaged image or an out-of-range label (the graph checks both)
            raise BadRecordError(f"TFDS {self.name}: a record of the batch of step {step_name(self.step)} is bad: "
                                 f"{e.message.splitlines()[0]}") from None
        self.step += 1
        return b


def tfds_train_iterator(name: str, split: str = "train", **kwargs) -> TfdsIterator:
    """Shorthand for :class:`TfdsIterator`."""
    return TfdsIterator(name, split, **kwargs)

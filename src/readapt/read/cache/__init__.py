"""Feature cache: READ's frozen-backbone hidden states, computed once per example and replayed afterwards.

Why it is valid. In READ's default (decoupled) mode every adapted stack runs frozen, without dropout, on inputs
that no trainable weight touches: the token ids, and for a T5 decoder the fixed target (or candidate answer)
tokens cross-attending to the *uncorrected* encoder output. A stack's layer outputs are then a function of the
example alone. The first pass stores them; later passes replay them through `ReadModel.replaying`: the stack's
layers do not run, the side network gets the stored states, and everything after the stack (pooler,
classifier, LM head, loss) is the backbone's own code, as in a live pass.

Padding. Only real tokens are stored; padded positions replay as zeros instead of what the live backbone
computes there. Nothing on real tokens changes: the side network works per token (an RNN across layers), the
decoder's encoder context masks padded encoder positions, and the heads read real positions only (BERT's
[CLS], the last real token of decoder-only classification, LM logits where the labels are not -100).

Exactness. A float32 cache replays exactly the values its build pass computed. The live backbone itself is not
bit-reproducible across batch compositions (a token's state moves in the last bits with the padding and the
neighbours of its batch: up to 3e-6 absolute on all-MiniLM-L6-v2 on CPU), so over shuffled epochs the losses
match a live run to float32 rounding; on the same batches they match bit for bit. float16 / bfloat16 caches
round every stored value (relative error up to 2^-11 / 2^-8).

One entry = one split (the training set, or one dev split). Per stack call of one forward pass (classification:
the single stack; text-to-text training: the encoder over the input, the decoder over the target; text-to-text
scoring: the encoder, then the decoder once per candidate answer) and per example, an array (slots, length, d):
the N layer outputs, the stack's final output when it differs from the last layer's (T5 and Llama end with a
final norm; BERT's encoder does not), and the embedding output when READ's h0 needs it.

Layout: <cache dir>/<key>/
    manifest.json    format, key and the fingerprint it hashes, dtype, per stream: stack, slots, width, tokens,
                     file size and sha256 of three 1 MiB blocks; build time
    index.json       per stream: token offset and length of every example
    stream-<k>.bin   raw values (float16, bfloat16 as uint16 bits since numpy has no bfloat16, or float32),
                     written and read by position (os.pwrite / os.preadv, not memory-mapped: the
                     process's peak RSS stays training's own memory)
Built in <key>.partial/ (fsynced, manifest last) and renamed into place, under a lock file: a killed writer
leaves only a .partial, which is never read and is deleted by the next build. An entry whose files disagree
with its manifest (a truncated file, a changed block) is rebuilt.

Key: sha256 over the backbone's weights and buffers (the task head excluded: it is trained, and its
initialisation depends on the seed) and config, the tokenizer, the token ids of every example in order (inputs,
targets, candidates), max length, text-to-text mode, autocast mode, cache dtype, the stacks and their shapes,
the torch and transformers versions and the format version. Which slots are stored is not part of it: an entry
that holds the embedding output also serves a run that does not need it.
"""

from readapt.read.cache.entries import (
    CACHE_DIR_ENV,
    CACHE_INDEX,
    CACHED_FEATURES,
    CachedBatch,
    CachedCall,
    CachedCollator,
    CacheEntry,
    CachePlan,
    StreamSpec,
    default_cache_dir,
    indexed,
    stream_spec,
)
from readapt.read.cache.fingerprint import backbone_fingerprint, sequences_fingerprint, tokenizer_fingerprint
from readapt.read.cache.store import FeatureCache

__all__ = [
    "CACHE_DIR_ENV", "CACHE_INDEX", "CACHED_FEATURES", "CacheEntry", "CachePlan", "CachedBatch", "CachedCall",
    "CachedCollator", "FeatureCache", "StreamSpec", "backbone_fingerprint", "default_cache_dir", "indexed",
    "sequences_fingerprint", "stream_spec", "tokenizer_fingerprint",
]

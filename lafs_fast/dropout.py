"""Deprecated: the counter-based dropout moved to lafs_fast.ops.dropout and is named for what it
is. Old name -> new: philox_dropout -> counter_dropout, PhiloxDropout -> CounterDropout,
use_philox_dropout -> use_counter_dropout (import them from lafs_fast.ops). This module goes in
the next release."""
import warnings

from .ops.dropout import CounterDropout, counter_dropout, use_counter_dropout

warnings.warn("lafs_fast.dropout is deprecated: use `from lafs_fast.ops import counter_dropout, "
              "CounterDropout, use_counter_dropout` (the new names of philox_dropout, PhiloxDropout, "
              "use_philox_dropout)", DeprecationWarning, stacklevel=2)

philox_dropout = counter_dropout
PhiloxDropout = CounterDropout
use_philox_dropout = use_counter_dropout

__all__ = ["philox_dropout", "PhiloxDropout", "use_philox_dropout"]

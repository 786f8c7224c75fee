"""`TrainerEngine`: ignite's `Engine` with variable epoch lengths and a lean epoch loop.

Written here rather than taken from ignite because ignite's own loop costs a tiny model
(a few hundred microseconds per step) several percent per iteration: every event of an
iteration formats a debug message, dispatches handlers through star-unpacked arguments and
creates a generator to check the terminate/interrupt flags, even when no handler is attached
and no flag is set. The loop below is ignite 0.5's ``_run_once_on_dataset_as_gen`` with the
same events, in the same order, with the same counters, termination, interruption and error
handling (``tests/test_engine_loop.py`` replays ignite's own loop against it); only the
per-iteration bookkeeping is cheaper. A DEBUG logger on the engine restores ignite's dispatch
exactly (with its messages). One fix: an epoch resumed after its last batch ends at once.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
import weakref
from collections.abc import Generator

from ignite.engine import Engine, Events, State
from ignite.engine.engine import _EngineTerminateException, _EngineTerminateSingleEpochException

_GET_STARTED, _GET_COMPLETED = Events.GET_BATCH_STARTED, Events.GET_BATCH_COMPLETED
_ITER_STARTED, _ITER_COMPLETED = Events.ITERATION_STARTED, Events.ITERATION_COMPLETED
_STOP_ITERATION = Events.DATALOADER_STOP_ITERATION
_LOOP_EVENTS = (_GET_STARTED, _GET_COMPLETED, _ITER_STARTED, _ITER_COMPLETED)


class TrainerEngine(Engine):
    """An ignite Engine whose epochs may hold different numbers of iterations.

    ignite assumes a constant ``epoch_length``; our samplers cut epochs by a points or mm
    budget, so their length varies. `SamplerEpochs` sets ``state.epoch_length`` at every
    EPOCH_STARTED; the run ends on ``max_epochs`` (or ``max_iters``) only.
    """

    def __init__(self, process_function) -> None:
        super().__init__(process_function)
        self._handlers_version = 0  # bumped when a handler list is replaced (removal)

    def remove_event_handler(self, handler, event_name) -> None:
        super().remove_event_handler(handler, event_name)
        self._handlers_version += 1

    def _fire_event(self, event_name, *event_args, **event_kwargs) -> None:
        """ignite's dispatch, minus its per-event debug message (formatted for every event even
        when DEBUG is off) and minus any work for events without handlers."""
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._fire_event(event_name, *event_args, **event_kwargs)
        self.last_event_name = event_name
        handlers = self._event_handlers.get(event_name)
        if handlers:
            self._call(handlers, event_args, event_kwargs)
        return None

    def _call(self, handlers: list, event_args: tuple = (), event_kwargs: dict | None = None
              ) -> None:
        """Call ``handlers`` (ignite's ``(func, args, kwargs)`` entries) as ignite calls them;
        one that takes only the engine is called without unpacking."""
        for func, args, kwargs in handlers:
            if args and isinstance(args[0], weakref.ref):  # ignite's reference to the engine
                engine = args[0]()
                if engine is None:
                    raise RuntimeError("Engine reference not resolved")
                if len(args) == 1 and not kwargs and not event_args and not event_kwargs:
                    func(engine)
                    continue
                if event_kwargs:
                    kwargs.update(event_kwargs)
                func(engine, *event_args, *args[1:], **kwargs)
            else:
                if event_kwargs:
                    kwargs.update(event_kwargs)
                func(*event_args, *args, **kwargs)

    def _fire_looked_up(self, event, handlers: list | None) -> bool:
        """Fire ``event``, whose ``handlers`` were looked up already; True if one of them asked
        to terminate or interrupt (ignite's `_maybe_terminate_or_interrupt` must then run)."""
        self.last_event_name = event
        if handlers:
            self._call(handlers)
        return self.should_terminate or self.should_terminate_single_epoch or \
            self.should_interrupt

    @staticmethod
    def _is_done(state: State) -> bool:
        if state.max_iters is not None and state.iteration >= state.max_iters:
            return True
        return state.max_epochs is not None and state.epoch >= state.max_epochs

    def _run_once_on_dataset_as_gen(self) -> Generator[State, None, float]:
        """One epoch (ignite 0.5's loop; see the module docstring): the handler lists of the
        four per-iteration events are looked up once (again after a removal), and ignite's
        `_maybe_terminate_or_interrupt` runs only when a handler set a stop flag.

        One deliberate difference: an epoch resumed after its last batch (a checkpoint saved
        before the epoch's end ran) ends at once; ignite would restart the data iterator and
        never end that epoch."""
        if self._init_iter is not None and self.state.epoch_length is not None and \
                self._init_iter >= self.state.epoch_length:
            self._init_iter = None
            return 0.0
        if self.logger.isEnabledFor(logging.DEBUG):
            return (yield from super()._run_once_on_dataset_as_gen())
        start_time = time.time()
        iter_counter = 0 if self._init_iter is None else self._init_iter
        self._init_iter = None
        should_exit = False
        state, fire, version = self.state, self._fire_looked_up, None
        try:
            if self._dataloader_iter is None:
                raise RuntimeError("Internal error, self._dataloader_iter is None.")
            while True:
                if version != self._handlers_version:  # the lists an iteration fires
                    version = self._handlers_version
                    get_started, get_completed, started, completed = (
                        self._event_handlers[e] for e in _LOOP_EVENTS)
                state.batch = None
                try:
                    # GET_BATCH_STARTED not twice when the data iterator was just restarted
                    if self.last_event_name is not _STOP_ITERATION and \
                            state.dataloader is not None and fire(_GET_STARTED, get_started):
                        yield from self._maybe_terminate_or_interrupt()
                    state.batch = next(self._dataloader_iter)
                    state.output = None
                    if state.dataloader is not None and fire(_GET_COMPLETED, get_completed):
                        yield from self._maybe_terminate_or_interrupt()
                    iter_counter += 1
                    should_exit = False
                except StopIteration:
                    if state.epoch_length is None:  # the first epoch defines its length
                        state.epoch_length = iter_counter
                        if state.max_iters is not None:
                            state.max_epochs = math.ceil(state.max_iters / state.epoch_length)
                        break
                    if should_exit:  # the restarted iterator is empty too
                        if not self._is_done(state):
                            total = (state.epoch_length * state.max_epochs
                                     if state.max_epochs is not None else state.max_iters)
                            warnings.warn(
                                "Data iterator can not provide data anymore but required total "
                                "number of iterations to run is not reached. Current iteration: "
                                f"{state.iteration} vs Total iterations to run : {total}",
                                stacklevel=2)
                        break
                    if state.dataloader is not None and \
                            fire(_STOP_ITERATION, self._event_handlers.get(_STOP_ITERATION)):
                        yield from self._maybe_terminate_or_interrupt()
                    self._setup_dataloader_iter()
                    should_exit = True
                    continue

                state.iteration += 1
                if fire(_ITER_STARTED, started):
                    yield from self._maybe_terminate_or_interrupt()
                state.output = self._process_function(self, state.batch)
                if fire(_ITER_COMPLETED, completed):
                    yield from self._maybe_terminate_or_interrupt()

                if state.epoch_length is not None and iter_counter == state.epoch_length:
                    break
                if state.max_iters is not None and state.iteration == state.max_iters:
                    self.should_terminate = True
                    raise _EngineTerminateException()

        except _EngineTerminateSingleEpochException:
            self._fire_event(Events.TERMINATE_SINGLE_EPOCH, iter_counter=iter_counter)
            self._setup_dataloader_iter()

        except _EngineTerminateException:
            raise

        except Exception as e:
            self.logger.error(f"Current run is terminating due to exception: {e}")
            self._handle_exception(e)

        return time.time() - start_time

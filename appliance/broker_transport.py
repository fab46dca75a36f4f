"""The embedded broker: kombu's filesystem transport, made safe for several processes and for crashes.

kombu's own transport has three races that the embedded appliance hits (a worker SIGKILLed mid-task and
restarted while the web process publishes is enough):
- it creates NAME.msg in the queue folder and only then writes it, so a worker polling in between takes an
  empty file and dies on the JSON error, and the message is lost;
- it claims a message by moving it to the system's temporary folder, which is a copy and a delete when that
  folder is on another file system, so two workers can both take one message;
- it creates a fanout exchange's table by truncating it before taking the lock, so a reader can read it empty.
Here a message is written under a name readers skip, flushed to disk and renamed into place (a rename within
one folder is atomic: a reader sees a whole message or none); a worker claims it by renaming it into the
broker's own processed folder (atomic: one worker wins); exchange tables are read and written under the lock.
A message file that still cannot be decoded (torn by a crash of the machine) is set aside, whole, in the
`unreadable_folder`, and logged; it never stops the worker.
"""
import logging
import itertools
import os
import uuid
from pathlib import Path
from time import monotonic_ns

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.transport.virtual import Empty
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)

_PARTIAL = ".partial"  # what a message is called while it is written; its name never ends in ".QUEUE.msg"
_sequence = itertools.count()  # orders this process's messages put within one tick of the clock


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # Readers take messages in the order of their names: the machine's monotonic clock (one for all
        # processes), zero-padded so that names sort as numbers do.
        name = f"{monotonic_ns():020d}_{next(_sequence):09d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + _PARTIAL
        try:
            with open(partial, "xb") as out:
                out.write(dumps(payload).encode())
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, final)
        except OSError as exc:
            _remove_quietly(partial)
            raise ChannelError(f"cannot add a message to the queue folder {self.data_folder_out!r}: {exc}") from exc

    def _get(self, queue):
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != f"{queue}.msg":
                continue
            claimed = os.path.join(self.processed_folder, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except FileNotFoundError:
                continue  # another worker claimed it first
            try:
                payload = Path(claimed).read_bytes()
                message = loads(payload)
            except ValueError as exc:
                self._set_aside(claimed, exc)
                continue
            except OSError as exc:
                raise ChannelError(f"cannot read the claimed message {claimed!r}: {exc}") from exc
            if not self.store_processed:
                _remove_quietly(claimed)
            return message
        raise Empty()

    def _set_aside(self, path: str, reason: Exception) -> None:
        """Keep an undecodable message file for an administrator to look at, out of every queue."""
        folder = self.transport_options.get("unreadable_folder") or self.processed_folder
        os.makedirs(folder, exist_ok=True)
        kept = os.path.join(folder, os.path.basename(path))
        os.replace(path, kept)
        log.error("broker: set aside the unreadable message %s (%s)", kept, reason)

    def get_table(self, exchange):
        with self._locked_table(exchange, filesystem.LOCK_SH) as (_file, table):
            return table

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        self._update_table(exchange, filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or ""),
                           add=True)

    def _delete(self, queue, exchange, routing_key, pattern, *args, **kwargs):
        # The virtual channel's part of a delete (its own state), then the exchange table's, under the lock.
        virtual.Channel._delete(self, queue, exchange, routing_key, pattern, *args, **kwargs)
        self._update_table(exchange, filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or ""),
                           add=False)

    def _update_table(self, exchange, binding, add: bool) -> None:
        with self._locked_table(exchange, filesystem.LOCK_EX, create=add) as (file, table):
            if file is None or (binding in table) == add:
                return
            table = [binding, *table] if add else [entry for entry in table if entry != binding]
            file.seek(0)
            file.truncate()
            file.write(dumps(table).encode())
            file.flush()

    def _locked_table(self, exchange, mode, create: bool = False):
        return _LockedTable(self._exchange_file(exchange), mode, create)


class _LockedTable:
    """An exchange's table of bindings, opened without truncating, locked, and read; [] when absent or empty."""

    def __init__(self, path: Path, mode: int, create: bool):
        self.path, self.mode, self.create = path, mode, create
        self.file = None

    def __enter__(self):
        writing = self.mode == filesystem.LOCK_EX
        flags = (os.O_RDWR if writing else os.O_RDONLY) | (os.O_CREAT if self.create else 0)  # never O_TRUNC
        try:
            if self.create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = os.fdopen(os.open(self.path, flags, 0o600), "r+b" if writing else "rb", buffering=0)
        except FileNotFoundError:
            return None, []
        except OSError as exc:
            raise ChannelError(f"cannot open the exchange table {self.path}: {exc}") from exc
        filesystem.lock(self.file, self.mode)
        self.file.seek(0)
        raw = self.file.read()
        return self.file, [filesystem.exchange_queue_t(*entry) for entry in (loads(raw) if raw else [])]

    def __exit__(self, *exc_info):
        if self.file is not None:
            filesystem.unlock(self.file)
            self.file.close()


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class Transport(filesystem.Transport):
    Channel = Channel

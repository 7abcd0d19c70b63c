"""kombu's filesystem transport, with each message written whole before it appears.

kombu's own writes a message into its final name in the queue folder, while
a worker may already be taking it: the worker moves the file away and reads
it before the bytes are in, finds it empty, and the message is lost
(celery/kombu#1551 reports the JSON error it raises). Seen here once in CI
as a prefork test waiting for a task that never ran. This writes under a
name the worker skips, then renames it into the queue in one step.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        # The worker sorts by name and takes "<anything>.<queue>.msg"; the
        # leading dot makes the partial file's tail "<...>.<queue>.msg.part".
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        partial = os.path.join(self.data_folder_out, f".{name}.part")
        with open(partial, "wb") as f:
            f.write(str_to_bytes(dumps(payload)))
        os.replace(partial, os.path.join(self.data_folder_out, name))


class Transport(filesystem.Transport):
    Channel = Channel

"""npz source: a folder of `.npz` files, each one feed dict (input name -> array)."""
from __future__ import annotations

import zipfile
from collections.abc import Iterator

import numpy as np
from pydantic import Field, field_validator

from pipeline.core.errors import PipelineError

from . import PATH, CalibrationSource, SourceParams

from pipeline.core.feeds import Feeds
from pipeline.core.recipe import package_file


class NpzParams(SourceParams):
    folder: str = Field(json_schema_extra=PATH, description="the folder of .npz files: relative to the recipe, or "
                        "inside `package`")
    package: str | None = Field(None, description="an installed package the folder lies in (as a model's "
                                "`package` + `file`): feeds shipped with a package")
    pattern: str = Field("*.npz", description="glob of the feed files inside the folder (relative: never above it)")

    @field_validator("pattern")
    @classmethod
    def _relative(cls, pattern: str) -> str:
        # pathlib's glob refuses an empty or absolute pattern with errors that name neither the key nor the file
        if not pattern.strip() or pattern.startswith(("/", "~")) or ".." in pattern.split("/"):
            raise ValueError(f"{pattern!r}: give a glob relative to the folder, such as '*.npz'")
        return pattern


TEXTS = "texts.txt"


class NpzFolder(CalibrationSource):
    """A folder of `.npz` feed files, read in name order. A `texts.txt` beside them, one line per `.npz` file
    of the folder in name order, gives the text each one speaks (for the ASR check of a model with declared
    audio)."""

    name = "npz"
    Params = NpzParams

    def _folder(self):
        folder = package_file(self.params.package, self.params.folder, folder=True) if self.params.package \
            else self.ctx.resolve(self.params.folder)
        if not folder.is_dir():
            raise PipelineError(f"calibration folder not found: {folder}")
        return folder

    def _texts(self, folder, files) -> list[str] | None:
        """Each chosen file's line of texts.txt; None without one. A count that does not match is an error."""
        path = folder / TEXTS
        if not path.is_file():
            return None
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise PipelineError(f"cannot read {path}: {e}") from None
        every = sorted(folder.glob("*.npz"))
        if len(lines) != len(every):
            raise PipelineError(f"{path}: {len(lines)} lines of text for {len(every)} .npz files; give one line "
                                f"per .npz file, in name order")
        line_of = dict(zip(every, lines))
        return [line_of.get(f, "") for f in files]

    def feeds(self) -> Iterator[Feeds]:
        folder = self._folder()
        files = sorted(folder.glob(self.params.pattern))
        self.spoken = self._texts(folder, files)
        for path in files:
            try:
                # allow_pickle=False: an .npz must hold plain arrays, never objects.
                with np.load(path, allow_pickle=False) as data:
                    yield {k: data[k] for k in data.files}
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise PipelineError(f"cannot read calibration file {path}: {e}") from None

    def describe(self) -> str:
        return f"npz folder {self.params.folder}"

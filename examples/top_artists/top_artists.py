"""Luigi's classic "Top Artists" workflow, for Python 3 and a fleet of nodes.

    Streams(date)                  one fake day of listening data per date
      -> AggregateArtists(date_interval)   streams per artist over the interval
        -> Top10Artists(date_interval)     the ten most streamed artists
          -> ArtistToplistToDatabase(date_interval)   (optional) into PostgreSQL

`--date-interval 2012-06` asks for a month: 30 independent Streams tasks that
any number of workers (or Poltergust nodes sharing one luigid) can run in
parallel, then one aggregation and one top-10 step.

All files go under the directory named by the environment variable
TOP_ARTISTS_DATA (default: ./data). When several nodes work on one pipeline,
point it at a directory they all share (NFS, a mounted bucket, ...): a task
run on one node must see the outputs written by another.

The database task reads its connection from TOP_ARTISTS_DB_HOST,
TOP_ARTISTS_DB_PORT, TOP_ARTISTS_DB_NAME, TOP_ARTISTS_DB_USER and
TOP_ARTISTS_DB_PASSWORD, and needs psycopg2 (install the `postgres` extra).

Run it alone with:

    python -m luigi --module top_artists Top10Artists --date-interval 2012-06 --local-scheduler
"""
from __future__ import annotations

import datetime
import itertools
import os
import random
import time
from collections import Counter

import luigi
from luigi.contrib import postgres

DATA_VARIABLE = "TOP_ARTISTS_DATA"

_ADJECTIVES = ["Velvet", "Electric", "Silent", "Golden", "Broken", "Midnight", "Paper", "Neon", "Wild", "Hollow"]
_NOUNS = ["Comets", "Lanterns", "Foxes", "Harbours", "Machines", "Orchards"]
ARTISTS = ["The_%s_%s" % pair for pair in itertools.product(_ADJECTIVES, _NOUNS)]
"""Sixty made-up artists; their names hold no whitespace (lines are split on it)."""

_POPULARITY = ARTISTS[:]
random.Random(20120601).shuffle(_POPULARITY)
"""Artists from most to least popular: a fixed order, so every run agrees."""


def data_dir() -> str:
    return os.environ.get(DATA_VARIABLE) or "data"


def data_target(name: str) -> luigi.LocalTarget:
    """A file under TOP_ARTISTS_DATA; luigi writes it atomically (temp file, then rename)."""
    return luigi.LocalTarget(os.path.join(data_dir(), name))


def fake_streams(date: datetime.date) -> list[tuple[str, str, str]]:
    """One day of (timestamp, artist, track) streams, the same for the same date on any machine."""
    rng = random.Random(date.toordinal())  # seeded by an int: stable across Python versions
    midnight = datetime.datetime.combine(date, datetime.time())
    streams = []
    for _ in range(1500 + int(rng.random() * 1000)):
        # A long tail: a few artists get most of the streams.
        artist = _POPULARITY[int(len(_POPULARITY) * rng.random() ** 2.5)]
        track = "track_%02d" % (1 + int(rng.random() * 12))
        moment = midnight + datetime.timedelta(seconds=int(rng.random() * 86400))
        streams.append((moment.isoformat(), artist, track))
    streams.sort()
    return streams


class Streams(luigi.Task):
    """A day of listening data: one line `timestamp artist track` per stream.

    In the original this is an external log dump; here it is generated, from
    the date alone, so the example needs no input data.
    """

    date = luigi.DateParameter()
    work_seconds = luigi.FloatParameter(
        default=0.0, significant=False,
        description="Pretend each day takes this long to produce (e.g. --Streams-work-seconds 2), "
                    "to watch the days spread over workers",
    )

    def output(self):
        return data_target("streams_%s.tsv" % self.date.isoformat())

    def run(self):
        if self.work_seconds > 0:
            time.sleep(self.work_seconds)  # simulated work, nothing waits on it
        with self.output().open("w") as out:
            for timestamp, artist, track in fake_streams(self.date):
                out.write("%s %s %s\n" % (timestamp, artist, track))


class AggregateArtists(luigi.Task):
    """Streams per artist over the interval: lines `artist<TAB>streams`, by artist."""

    date_interval = luigi.DateIntervalParameter()

    def output(self):
        return data_target("artist_streams_%s.tsv" % self.date_interval)

    def requires(self):
        return [Streams(date) for date in self.date_interval]

    def run(self):
        artist_count: Counter[str] = Counter()
        for streams in self.input():
            with streams.open("r") as in_file:
                for line in in_file:
                    _timestamp, artist, _track = line.split()
                    artist_count[artist] += 1
        with self.output().open("w") as out:
            for artist in sorted(artist_count):
                out.write("%s\t%d\n" % (artist, artist_count[artist]))


class Top10Artists(luigi.Task):
    """The ten most streamed artists: lines `date_from<TAB>date_to<TAB>artist<TAB>streams`.

    Sorted by streams, most first (ties by artist name); date_to is exclusive.
    """

    date_interval = luigi.DateIntervalParameter()

    def requires(self):
        return AggregateArtists(self.date_interval)

    def output(self):
        return data_target("top_artists_%s.tsv" % self.date_interval)

    def run(self):
        ranked = sorted(self._input_iterator(), key=lambda pair: (-pair[0], pair[1]))
        with self.output().open("w") as out:
            for streams, artist in ranked[:10]:
                out.write("%s\t%s\t%s\t%d\n" % (self.date_interval.date_a, self.date_interval.date_b, artist, streams))

    def _input_iterator(self):
        with self.input().open("r") as in_file:
            for line in in_file:
                artist, streams = line.rstrip("\n").split("\t")
                yield int(streams), artist


class ArtistToplistToDatabase(postgres.CopyToTable):
    """Copies the top 10 into the PostgreSQL table `top10` (created if missing).

    Done once per interval: luigi records the copy in the database's
    `table_updates` marker table, so a re-run inserts nothing twice.
    """

    date_interval = luigi.DateIntervalParameter()

    table = "top10"
    columns = [
        ("date_from", "DATE"),
        ("date_to", "DATE"),
        ("artist", "TEXT"),
        ("streams", "INT"),
    ]

    @property
    def host(self):
        return os.environ.get("TOP_ARTISTS_DB_HOST") or "localhost"

    @property
    def port(self):
        return int(os.environ.get("TOP_ARTISTS_DB_PORT") or 5432)

    @property
    def database(self):
        return os.environ.get("TOP_ARTISTS_DB_NAME") or "toplists"

    @property
    def user(self):
        return os.environ.get("TOP_ARTISTS_DB_USER") or "luigi"

    @property
    def password(self):
        return os.environ.get("TOP_ARTISTS_DB_PASSWORD") or None

    def requires(self):
        return Top10Artists(self.date_interval)


if __name__ == "__main__":
    luigi.run()

"""The dataset report of a large dataset, computed on the default queue (``studio.dataset_report``).

The API stored the request on a pending ``DatasetReportRecord``; this fills it. A redelivered message for
a report that is no longer pending does nothing.
"""

from __future__ import annotations

import logging
import uuid

from app.core.db import session_scope
from app.core.layout import read_dataset_rows
from app.core.storage import get_storage
from app.datasets.report import fill_record
from app.models import Dataset, DatasetReportRecord, ReportStatus

log = logging.getLogger(__name__)


def run_dataset_report(report_id: uuid.UUID) -> str:
    with session_scope() as session:
        record = session.get(DatasetReportRecord, report_id)
        if record is None or record.status is not ReportStatus.pending:
            return "skipped"
        dataset = session.get(Dataset, record.dataset_id)
        if dataset is None:
            return "skipped"
        fill_record(record, rows=read_dataset_rows(get_storage(), dataset.id), fmt=dataset.format)
        session.add(record)
        session.commit()
        log.info("dataset report %s: %s", report_id, record.status.value)
        return record.status.value

/**
 * Training reports: {@link ReportRecorder} collects a {@link TrainingHistory} from {@link train}'s
 * callbacks and {@link renderReport} turns it into one self-contained HTML page.
 * @module
 */
export { ReportRecorder, type ReportRecorderOptions } from './recorder';
export { renderReport } from './render';
export type { EpochRecord, MemoryRecord, StepRecord, TrainingHistory } from './history';

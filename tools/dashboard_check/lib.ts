// Types the generated dashboard checks (generated/*.ts, written by generate_ts.py) are checked against.
//
// Grafana's own schema (@grafana/schema) types a dashboard loosely where plugins come in: a panel's `options`,
// `fieldConfig.defaults.custom` and `targets` are open records. Each panel type is therefore re-typed here with its
// plugin's generated types (TimeSeries, Stat, Table, StateTimeline, BarGauge, Text), and targets with Grafana's
// Prometheus query model, so that a misspelt or misplaced key anywhere is an excess-property error.
import type {
  DataQuery,
  DataSourceRef,
  Dashboard,
  FieldConfig,
  FieldConfigSource,
  Panel,
  RowPanel,
} from '@grafana/schema';
import type * as BarGauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as StateTimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as Text from '@grafana/schema/dist/esm/raw/composable/text/panelcfg/x/TextPanelCfg_types.gen';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

// JSON holds an enum's values ("line"), which TypeScript's string enums reject: map every enum to the union of its
// values' literal types, recursively. Object types stay exact, so excess-property checks still apply.
export type Lit<T> = T extends string
  ? (string extends T ? T : `${T}`)
  : T extends number | boolean | null | undefined
    ? T
    : T extends readonly (infer U)[]
      ? Lit<U>[]
      : T extends object
        ? { [K in keyof T]: Lit<T[K]> }
        : T;

// Grafana's Prometheus query (public/app/plugins/datasource/prometheus, @grafana/prometheus `PromQuery`): the
// fields a saved dashboard carries.
export interface PromQuery extends DataQuery {
  datasource?: DataSourceRef;
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  editorMode?: 'code' | 'builder';
  interval?: string;
  intervalFactor?: number;
  exemplar?: boolean;
}

// Stat and bar gauge have no custom field config.
type NoCustom = Record<string, never>;

type Fields<C> = Omit<FieldConfigSource, 'defaults'> & { defaults: Omit<FieldConfig, 'custom'> & { custom?: C } };

type PanelOf<T extends string, O, C> = Omit<Panel, 'type' | 'options' | 'fieldConfig' | 'targets'> & {
  type: T;
  options: O;
  fieldConfig: Fields<C>;
  targets: PromQuery[];
};

export type TimeSeriesPanel = PanelOf<'timeseries', TimeSeries.Options, TimeSeries.FieldConfig>;
export type StatPanel = PanelOf<'stat', Stat.Options, NoCustom>;
export type TablePanel = PanelOf<'table', Table.Options, Table.FieldConfig>;
export type StateTimelinePanel = PanelOf<'state-timeline', StateTimeline.Options, StateTimeline.FieldConfig>;
export type BarGaugePanel = PanelOf<'bargauge', BarGauge.Options, NoCustom>;
export type TextPanel = Omit<Panel, 'type' | 'options' | 'fieldConfig' | 'targets' | 'datasource'> & {
  type: 'text';
  options: Text.Options;
};
export type { Dashboard, RowPanel };

// One panel, checked as the type its `type` names (the argument is an object literal: excess keys are errors).
export function panel<T>(value: Lit<T>): Lit<T> {
  return value;
}

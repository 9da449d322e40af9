// Types for /client/tether.js (SPEC section 13).

export type Transport = "ws" | "sse";
export type StateName = "connecting" | "connected" | "disconnected" | "reconnecting" | "closed";

export interface Backoff {
  /** First attempt's cap, ms (default 250). */
  minDelayMs?: number;
  /** Largest cap, ms (default 30000). */
  maxDelayMs?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** Up this long after welcome, a drop resets the attempt counter (default 30000). */
  stableMs?: number;
  /** SSE: heartbeat assumed until a welcome says otherwise (default 25000). */
  heartbeatMs?: number;
  /** SSE: heartbeat timeout assumed until a welcome says otherwise (default 10000). */
  heartbeatTimeoutMs?: number;
}

export interface TetherOptions {
  /** Client id (auth mode none). */
  client?: string;
  /** Token (auth mode jwt): first frame on WebSocket, `token` query parameter on SSE. */
  token?: string;
  /** Returns a fresh token: before the first connection without `token`, and after 4003/4401. */
  getToken?: () => string | Promise<string>;
  /** "ws" (default, url ws://host/ws) or "sse" (url http://host/sse). */
  transport?: Transport;
  backoff?: Backoff;
  /** End in a fatal "closed" after this many consecutive failed attempts. */
  failureCap?: number;
  /** How long opening a socket and getting its welcome may take, ms (default 10000). */
  connectTimeoutMs?: number;
  /** Seeds the jitter (tests). */
  seed?: number;
  /** Constructors to use instead of the globals (tests). */
  WebSocket?: unknown;
  EventSource?: unknown;
}

export interface StateEvent {
  state: StateName;
  attempt?: number;
  delay_ms?: number;
  code?: number | null;
  reason?: string;
  will_reconnect?: boolean;
  fatal?: boolean;
}

export interface MessageEvent {
  channel: string;
  id: string;
  position: string;
  data: unknown;
}

export interface RecoveredEvent {
  channel: string;
  /** The channel's position when it resumed (null when the transport does not say). */
  position: string | null;
  /** false: messages were lost; re-fetch the state. */
  recovered: boolean;
  /** How many were replayed (null on SSE, where the server does not say). */
  missed: number | null;
}

export interface DirectEvent {
  id: string;
  data: unknown;
}

export interface ErrorEvent {
  code: string;
  message: string;
  channel?: string | null;
}

export interface Stats {
  attempts: number;
  successes: number;
  failures: Record<string, number>;
  reconnects: number;
  messages: number;
  duplicates: number;
  connected_ms: number;
}

export interface EventMap {
  state: StateEvent;
  message: MessageEvent;
  recovered: RecoveredEvent;
  subscribed: RecoveredEvent;
  direct: DirectEvent;
  error: ErrorEvent;
}

export declare class TetherClient {
  constructor(url: string, opts?: TetherOptions);
  on<K extends keyof EventMap>(event: K, fn: (e: EventMap[K]) => void): this;
  subscribe(channel: string): void;
  unsubscribe(channel: string): void;
  connect(): void;
  close(): void;
  stats(): Stats;
  /** The machine's phase: idle, refreshing, connecting, connected, waiting or closed. */
  readonly state: string;
}

export declare const DEFAULTS: Readonly<Required<Backoff> & { connectTimeoutMs: number }>;
export declare function backoffCap(b: Required<Backoff>, n: number): number;
export declare function branch(
  code: number | null,
  announced: { code: number; reason: string; reconnect: boolean; retry_ms: number | null } | null,
  hasRefresher: boolean,
): { kind: "stop" | "fatal" | "refresh" | "server" | "backoff"; retryMs?: number | null };
export declare function parsePosition(s: string): { epoch: string; offset: number } | null;
export declare function makeRng(seed: number): () => number;
export declare function newMachine(opts?: object): object;
export declare function step(m: object, input: object): [object, object[]];
export declare function statsAt(m: object, now: number): Stats;
export declare function sseQuery(m: object): { channels: string[]; since: string | null };
export declare function cursorPositions(cursor: string): string[];

-- wrk script of bench/serving.py: POSTs the body in the file BENCH_BODY as
-- BENCH_CONTENT_TYPE (JSON when unset), with the Authorization header BENCH_AUTH when
-- set, and stops its thread after BENCH_MAX_PER_THREAD answers.
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
local limit = tonumber(os.getenv("BENCH_MAX_PER_THREAD"))
local answered = 0
function response(status, headers, body)
  answered = answered + 1
  if answered >= limit then wrk.thread:stop() end
end

-- wrk script for the Files API: the headers an SDK sends, a choice of paths, and a JSON summary.
--
-- Arguments (after `--`), key=value:
--   key=K            the x-api-key to send (the proxy key, or the upstream key when direct)
--   path=P           always request P (a metadata hit, a list page)
--   ids=FILE         file ids, one a line, most popular first; with mode=cycle or mode=zipf
--   mode=M           fixed (default) | cycle | zipf. cycle: each thread walks its own slice of the
--                    ids in order, so no two requests in flight share an id (with more ids than
--                    connections)
--   threads=N        wrk's -t, so that cycle can give each thread its own slice
--   zipf=S           Zipf exponent for mode=zipf (default 1.0)
--   lists=FILE       list-page paths, one a line, most popular first (with mode=zipf)
--   list_share=F     with mode=zipf, the share of list-page reads
--   delay_ms=D       wait a random time (exponential, mean D ms) before each request of a
--                    connection: an offered load of connections * 1000 / D req/s, well below what
--                    the server can take, so latency is the service's and not a queue's
--   nocache=1        send Cache-Control: no-cache (the proxy then fetches upstream, and stores)
-- done() prints one line: BENCH_JSON {...}.

local threads = {}
local counter = 0

function setup(thread)
   counter = counter + 1
   thread:set("id", counter)
   table.insert(threads, thread)
end

local function parse(args)
   local options = {mode = "fixed", zipf = "1.0", list_share = "0"}
   for _, arg in ipairs(args) do
      local name, value = arg:match("^([%w_]+)=(.*)$")
      if name == nil then error("bad argument: " .. arg) end
      options[name] = value
   end
   return options
end

local function read_lines(path)
   local lines = {}
   for line in io.lines(path) do
      if line ~= "" then table.insert(lines, line) end
   end
   if #lines == 0 then error("nothing in " .. path) end
   return lines
end

local function zipf_cdf(count, s)
   local total, weights, cdf = 0, {}, {}
   for k = 1, count do
      weights[k] = 1 / (k ^ s)
      total = total + weights[k]
   end
   local running = 0
   for k = 1, count do
      running = running + weights[k] / total
      cdf[k] = running
   end
   cdf[count] = 1
   return cdf
end

local requests = {}
local lists = {}
local cdf = nil
local list_cdf = nil
local list_share = 0
local mode = "fixed"
local next_index = 1
local last_index = 1
local first_index = 1

local function pick(cdf)
   local u = math.random()
   local low, high = 1, #cdf
   while low < high do
      local mid = math.floor((low + high) / 2)
      if cdf[mid] < u then low = mid + 1 else high = mid end
   end
   return low
end

function init(args)
   local options = parse(args)
   math.randomseed(os.time() * 1000 + (id or 0))
   math.random()
   wrk.headers["x-api-key"] = options.key
   wrk.headers["anthropic-version"] = "2023-06-01"
   wrk.headers["anthropic-beta"] = "files-api-2025-04-14"
   if options.nocache == "1" then wrk.headers["Cache-Control"] = "no-cache" end
   local mean_delay = tonumber(options.delay_ms or "0")
   if mean_delay > 0 then
      delay = function() return -math.log(1 - math.random()) * mean_delay end
   end
   mode = options.mode
   if mode == "fixed" then
      requests = {wrk.format("GET", options.path)}
      return
   end
   local ids = read_lines(options.ids)
   for i, file_id in ipairs(ids) do
      requests[i] = wrk.format("GET", "/v1/files/" .. file_id)
   end
   if mode == "cycle" then
      local threads = tonumber(options.threads or "1")
      local slice = math.floor(#ids / threads)
      first_index = ((id or 1) - 1) * slice + 1
      last_index = first_index + slice - 1
      -- A random start, so a run does not follow the requests a previous run left in flight.
      next_index = first_index + math.random(0, slice - 1)
   elseif mode == "zipf" then
      cdf = zipf_cdf(#ids, tonumber(options.zipf))
      list_share = tonumber(options.list_share)
      if list_share > 0 then
         for i, path in ipairs(read_lines(options.lists)) do
            lists[i] = wrk.format("GET", path)
         end
         list_cdf = zipf_cdf(#lists, tonumber(options.zipf))
      end
   end
end

function request()
   if mode == "fixed" then return requests[1] end
   if mode == "cycle" then
      local chosen = requests[next_index]
      next_index = next_index + 1
      if next_index > last_index then next_index = first_index end
      return chosen
   end
   if list_share > 0 and math.random() < list_share then return lists[pick(list_cdf)] end
   return requests[pick(cdf)]
end

function done(summary, latency, _)
   local errors = summary.errors
   local socket_errors = errors.connect + errors.read + errors.write + errors.timeout
   local seconds = summary.duration / 1e6
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_s":%.3f,"rps":%.1f,"p50_ms":%.3f,"p99_ms":%.3f,' ..
      '"status_errors":%d,"socket_errors":%d,"errors":%d}\n',
      summary.requests, seconds, summary.requests / seconds,
      latency:percentile(50) / 1000, latency:percentile(99) / 1000,
      errors.status, socket_errors, errors.status + socket_errors))
end

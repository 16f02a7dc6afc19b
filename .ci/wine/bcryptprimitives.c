/*
 * bcryptprimitives.dll shim for running Go >= 1.22 Windows binaries under
 * Wine < 9 (Debian bookworm ships Wine 8.0, which has no bcryptprimitives).
 *
 * Go's runtime loads bcryptprimitives.dll from system32 at start-up and
 * takes its random bytes from ProcessPrng; without the DLL every Go program
 * dies with "bcryptprimitives.dll not found". This DLL exports ProcessPrng
 * implemented with RtlGenRandom (advapi32!SystemFunction036), which Wine 8
 * has. Test use only: .ci/wine.sh builds it with mingw-w64 and copies it
 * into the throw-away WINEPREFIX's system32.
 */
#include <windows.h>

/* RtlGenRandom; declared here because ntsecapi.h hides it behind a macro. */
BOOLEAN WINAPI SystemFunction036(PVOID buf, ULONG len);

/* ProcessPrng fills data with len random bytes; it reports TRUE on success
 * (the real one never fails). RtlGenRandom takes a ULONG, so long requests
 * go in chunks. */
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
	while (len > 0) {
		ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
		if (!SystemFunction036(data, n))
			return FALSE;
		data += n;
		len -= n;
	}
	return TRUE;
}

BOOL WINAPI DllMain(HINSTANCE inst, DWORD reason, LPVOID reserved)
{
	(void)inst;
	(void)reason;
	(void)reserved;
	return TRUE;
}

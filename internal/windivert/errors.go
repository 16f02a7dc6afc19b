package windivert

import "fmt"

// Windows error codes WinDivert reports (winerror.h).
const (
	ErrorFileNotFound          = 2
	ErrorAccessDenied          = 5
	ErrorInvalidHandle         = 6
	ErrorInvalidParameter      = 87
	ErrorInsufficientBuffer    = 122
	ErrorNoData                = 232
	ErrorOperationAborted      = 995
	ErrorIOPending             = 997
	ErrorInvalidImageHash      = 577
	ErrorDriverFailedPriorUnld = 654
	ErrorServiceDoesNotExist   = 1060
	ErrorHostUnreachable       = 1232
	ErrorDriverBlocked         = 1275
	EptSNotRegistered          = 1753
)

// Describe explains an error of WinDivertOpen, naming the file or cause;
// it returns "" for codes without a specific explanation.
func Describe(code uint32, ptrSize int) string {
	sys := "WinDivert64.sys"
	if ptrSize == 4 {
		sys = "WinDivert32.sys"
	}
	switch code {
	case ErrorFileNotFound:
		return fmt.Sprintf("the driver file %s was not found next to WinDivert.dll", sys)
	case ErrorAccessDenied:
		return "WinDivert needs Administrator privileges"
	case ErrorInvalidParameter:
		return "WinDivert rejected the filter, layer, priority or flags"
	case ErrorInvalidImageHash:
		return fmt.Sprintf("%s has no valid digital signature for this Windows (driver signing, or Secure Boot / HVCI policy)", sys)
	case ErrorDriverFailedPriorUnld:
		return "an incompatible version of the WinDivert driver is already loaded (close programs using it, or reboot)"
	case ErrorServiceDoesNotExist:
		return "the WinDivert driver is not installed and FlagNoInstall forbids installing it"
	case ErrorDriverBlocked:
		return fmt.Sprintf("%s was blocked (security software, or a virtual machine without driver support)", sys)
	case EptSNotRegistered:
		return "the Base Filtering Engine service is disabled (enable the BFE service)"
	case ErrorHostUnreachable:
		return "an impostor packet's TTL or hop limit reached zero"
	}
	return ""
}
